"""A MIL runtime: load an ML program (.mlpackage) and execute its main function with PyTorch CPU kernels.

Core ML cannot predict on Linux, so this is how CI checks numerically what actually ships: each op runs in
float64 and its result is rounded to the dtype the program declares (fp16 or fp32), as the device stores it; the
outputs are then the same on any CPU (stable.py).
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
