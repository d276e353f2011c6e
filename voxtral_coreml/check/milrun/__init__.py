"""A MIL runtime: load an ML program (.mlpackage) and execute one of its functions with PyTorch CPU kernels.

Core ML cannot predict on Linux, so this is how CI checks numerically what actually ships: each op runs in
float64 and its result is rounded to the dtype the program declares (fp16 or fp32), as the device stores it; the
outputs are then the same on any CPU (stable.py). A multifunction
package runs the function named; a stateful function (iOS18 Core ML states) keeps its state in a MilState
across predictions, as an app keeps its MLState.
"""

from .model import MilModel, MilState, TensorInfo, load_package, load_program, op_counts
from .plan import SUPPORTED_OPS, program_op_types

__all__ = [
    "SUPPORTED_OPS",
    "MilModel",
    "MilState",
    "TensorInfo",
    "load_package",
    "load_program",
    "op_counts",
    "program_op_types",
]
