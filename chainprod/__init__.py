"""chainprod: per-layer gradients of deep sequential models by parallel prefix scans.

The gradient of layer ``l`` needs the suffix product ``A_L ... A_{l+1}`` of
input Jacobians. Backprop forms these one after another; a prefix scan forms
all of them in ``ceil(log2 L)`` rounds. chainprod plans such scans
(:func:`schedule`), runs them on local cores, Ray or Dask (``backend=``), and
measures where that beats backprop.

>>> import chainprod as cp
>>> chain = cp.mlp([4, 8, 8, 1])
>>> g = cp.grad(chain, [0.1, 0.2, 0.3, 0.4], method="sklansky")
>>> [p.shape for p in g[0]]
[(8, 4), (8,)]
"""

from . import cost, errors
from ._caches import clear_caches
from ._version import __version__
from .blocks import BlockSeq, Diag, Segment
from .check import check_grad, numerical_grad

# ``schedule`` and ``valid_schedules`` are the cost level's: they know ``"auto"``, which the
# plain registry (``SCHEDULES``, ``chainprod.schedules.schedule``) does not.
from .cost import resolve_schedule as schedule
from .cost import valid_schedules
from .errors import (
    ClusterConnectionError,
    ConvergenceError,
    DistributedError,
    DistributedTimeoutError,
    GradientCheckError,
    NonFiniteError,
    UnsupportedModuleError,
)
from .executors import Executor, Trace, cluster, get_executor, register_executor, valid_backends
from .grad import backward, grad, loss_cotangent, loss_seed, value_and_grad
from .kernels import LayerGrads
from .layers import ACTIVATIONS, Chain, Dense, Diagonal, diagonal_chain, mlp
from .newton import NewtonTrace, forward  # forward(model, x, method="sequential" | Newton methods)
from .plan import Plan, plan
from .products import product, suffix_products
from .recurrence import linear_recurrence
from .recurrent import GRU, LSTM, RNN
from .rnn import ElmanRNN, rnn_value_and_grad
from .schedules import SCHEDULES, Schedule, ScheduleError, ScheduleInfo, register_schedule
from .shard import ShardedGrads, ShardedModel, ShardTrace, shard
from .shard_time import ShardedSequence, TimeTrace, shard_sequence
from .ssm import DiagonalRecurrence
from .tape import Tape

#: Every public function's return and error types are here too, so users can
#: name them in annotations and ``except`` clauses without knowing the module.
__all__ = [
    "ACTIVATIONS", "BlockSeq", "Chain", "ClusterConnectionError", "ConvergenceError", "Dense", "Diag",
    "Diagonal", "DiagonalRecurrence", "DistributedError", "DistributedTimeoutError", "ElmanRNN", "Executor",
    "GRU", "GradientCheckError", "LSTM", "LayerGrads", "NewtonTrace", "NonFiniteError", "Plan", "RNN",
    "SCHEDULES", "Schedule", "ScheduleError", "ScheduleInfo", "Segment", "ShardTrace", "ShardedGrads",
    "ShardedModel", "ShardedSequence", "Tape", "TimeTrace", "Trace", "UnsupportedModuleError", "__version__",
    "backward", "check_grad", "clear_caches", "cluster", "cost", "diagonal_chain", "errors", "forward",
    "from_torch", "get_executor", "grad", "linear_recurrence", "loss_cotangent", "loss_seed", "mlp",
    "numerical_grad", "plan", "product", "register_executor", "register_schedule", "rnn_value_and_grad",
    "schedule", "shard", "shard_sequence", "suffix_products", "torch_backward", "valid_backends",
    "valid_schedules", "value_and_grad",
]


def __getattr__(name):
    # The torch adapter loads torch: only on first use, so ``import chainprod`` never does.
    if name in ("from_torch", "torch_backward"):
        from . import torch as torch_adapter

        return getattr(torch_adapter, name)
    raise AttributeError(f"module 'chainprod' has no attribute {name!r}")
