"""The inputs one op receives, with typed readers that apply the MIL defaults of optional parameters."""

from collections.abc import Callable
from typing import Any

import torch

Result = torch.Tensor | tuple[torch.Tensor, ...]


class OpArgs(dict[str, Any]):
    """An op's inputs by MIL parameter name: tensors, strings, or lists of tensors for tuple inputs.

    An optional parameter the program leaves out is simply absent, so each reader takes the MIL default.
    """

    def tensor(self, name: str) -> torch.Tensor:
        return self[name]

    def ints(self, name: str, default: list[int] | None = None) -> list[int]:
        if name not in self:
            if default is None:
                raise KeyError(name)
            return default
        value = self[name].tolist()
        return value if isinstance(value, list) else [value]

    def integer(self, name: str, default: int | None = None) -> int:
        return int(self._scalar(name, default))

    def maybe_integer(self, name: str) -> int | None:
        return int(self[name].item()) if name in self else None

    def number(self, name: str, default: float | None = None) -> float:
        return float(self._scalar(name, default))

    def flag(self, name: str, default: bool | None = None) -> bool:
        return bool(self._scalar(name, default))

    def text(self, name: str, default: str | None = None) -> str:
        value = self.get(name, default)
        if value is None:
            raise KeyError(name)
        return value

    def _scalar(self, name: str, default: Any) -> Any:
        if name not in self:
            if default is None:
                raise KeyError(name)
            return default
        return self[name].item()


Kernel = Callable[[OpArgs], Result]
