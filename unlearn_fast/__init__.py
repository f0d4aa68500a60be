"""unlearn_fast: fast, measured machine unlearning for PyTorch."""
from . import ops
from .backends import backends, release_output_cache, use_backend
from .influence import hvp, ihvp, influence, self_influence, tracin  # influence.py re-exports hvp, ihvp
from .ops import (
    dequantize_axpy_,
    dequantize_blockwise,
    lbfgs_compact,
    lbfgs_matvec,
    qn_step_,
    quantize_blockwise,
    quantize_rows,
    softmax_linear_hvp,
)

__version__ = "0.1.0"
from .history import GradientHistory, HistoryPolicy
from .recording import HistoryRecorder
from .data import IndexedDataset, split_batch
from .unlearn import UnlearnResult, unlearn
from .optimizers import register_optimizer
from .methods._common import NotUnlearnedError, UnsupportedTrainingError
from . import metrics
from .metrics import audit
