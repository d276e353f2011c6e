"""A MIL runtime: load an ML program (.mlpackage) and execute its main function with PyTorch CPU kernels.

Core ML cannot predict on Linux, so this is how CI checks numerically what actually ships: each op runs in
fp32 and results the program declares fp16 are rounded to fp16, as the device stores them.
"""

from .model import MilModel, TensorInfo, load_package, load_program, op_counts
from .plan import SUPPORTED_OPS, program_op_types

__all__ = [
    "SUPPORTED_OPS",
    "MilModel",
    "TensorInfo",
    "load_package",
    "load_program",
    "op_counts",
    "program_op_types",
]
