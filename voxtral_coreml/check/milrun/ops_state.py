"""Core ML state ops (iOS18): a function reads and writes fp16 buffers that outlive one prediction.

The runtime feeds a state input as a StateBuffer; writing replaces the buffer's tensor instead of copying into
it, so a value read before the write keeps the old contents, as read_state's copy semantics require.
"""

from dataclasses import dataclass

import torch

from .args import Kernel, OpArgs, Result


@dataclass
class StateBuffer:
    """One state's current contents: fp16 values held in fp32 storage, like every fp16 tensor here."""

    value: torch.Tensor


def _read_state(a: OpArgs) -> Result:
    """read_state(input): the state's contents (a copy in MIL; here the tensor, which no kernel mutates)."""
    return a["input"].value


def _coreml_update_state(a: OpArgs) -> Result:
    """coreml_update_state(state, value): store value as the state's contents, and return it."""
    buffer: StateBuffer = a["state"]
    buffer.value = a.tensor("value")
    return buffer.value


KERNELS: dict[str, Kernel] = {
    "read_state": _read_state,
    "coreml_update_state": _coreml_update_state,
}
