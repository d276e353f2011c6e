"""Voxtral's audio encoder + projector as Core ML packages for the Apple Neural Engine."""

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("voxtral-coreml")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

# transformers imports torchao when it is installed (coreai-opt needs it), in every process that imports transformers:
# torchao then warns that this machine lacks its GPU kernels, and torch that torchao registers enums the old way.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
