"""Plans a user can hold: decide once what runs, reuse it on every call.

``cp.plan(chain, method=..., backend=..., workers=...)`` resolves the method
to a :class:`~chainprod.schedules.Schedule` (or to backprop) once, for the
chain's shapes, and keeps it, with the kernels and the executor, for every
later ``plan.grad(x)`` (opt_einsum's ``contract_expression`` habit). Bound
plans underneath (slabs of the numpy executors, flat op tables of the
compiled kernels) are cached by value, so a held plan also holds warm caches.

``method="auto"`` on the compiled kernels is decided on the first call, from
that call's real data (:mod:`chainprod.autotune`), and kept.

A plan holds the chain it was made from, and a :class:`~chainprod.Chain` is
immutable: after ``chain = chain.sgd_step(g, lr)`` give the plan the new
parameters, per call (``p.grad(x, params=chain)``) or once
(``p = p.with_params(chain)``, no re-planning). A plan whose chain was
superseded by ``sgd_step`` and is given no parameters warns that it computes
at the old ones.

>>> import numpy as np, chainprod as cp
>>> p = cp.plan(cp.mlp([4, 8, 8, 1]), method="sklansky")
>>> p.schedule.name, p.schedule.length
('sklansky', 2)
>>> g = p.grad(np.ones((3, 4)))
>>> len(g)
3
>>> q = cp.plan(16, method="brent_kung")          # a plan for suffix products of 16 matrices
>>> q.schedule.rounds
7
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping

import numpy as np

from ._validate import check_workers
from .backward_numpy import jacobian_shapes
from .cost import AUTO, resolve_schedule
from .executors import Executor, get_executor
from .forward_methods import add_forward_note, chain_tape, check_forward
from .grad import backward, loss_cotangent, make_trace
from .layers import Chain
from .products import product, read_blocks, suffix_products
from .schedules import Schedule
from .tape import resolve_kernels

__all__ = ["Plan", "plan"]


class Plan:
    """A held plan: the chain (or product length), the resolved method, the kernels and the backend.

    Attributes
    ----------
    method : str or Schedule
        What was asked for.
    schedule : Schedule or str or None
        What runs: a Schedule, ``"backprop"``, or ``None`` until an ``auto``
        plan on the compiled kernels, or on Ray or Dask, has seen its first batch.
    backend, workers, kernels
        As in :func:`chainprod.grad`.
    chain : Chain or None
        The chain whose parameters :meth:`grad` uses when given none (see
        :meth:`with_params`).
    forward, forward_options
        The forward pass every gradient runs on (``"sequential"``, or a
        Newton method such as ``"deer"``), as in :func:`chainprod.grad`.
    """

    def __init__(self, target, *, method="auto", backend="vectorized", workers=None, kernels=None, batch=1,
                 engine_options=None, forward="sequential", forward_options=None):
        self.workers = check_workers(workers)
        self.forward, self.forward_options = check_forward(forward, forward_options)
        if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be a positive int (the batch size to plan for), got {batch!r}")
        executor = backend if isinstance(backend, Executor) else get_executor(backend)  # unknown: fails here
        if not isinstance(engine_options, (Mapping, type(None))):
            raise TypeError(f"engine_options must be a dict (e.g. {{'timeout': 30}}) or None, got {engine_options!r}")
        if engine_options:
            executor.check_options(dict(engine_options))  # names and values, here rather than on the first call
        self.backend = backend
        self.kernels = resolve_kernels(kernels)
        self.engine_options = dict(engine_options or {})
        self.method = method
        self.chain = target if isinstance(target, Chain) else None
        if self.chain is None and self.forward != "sequential":
            raise ValueError(f"forward={self.forward!r}: a forward pass is for a plan of a Chain's gradients, "
                             "not of a product of matrices")
        if self.chain is not None:
            self.length = len(self.chain) - 1
            self.schedule = self._resolve_for_chain(method, int(batch))
        else:
            self.length, blocks = _product_shapes(target)
            self.schedule = resolve_schedule(method, self.length, workers=self.workers, blocks=blocks,
                                             backend=backend)

    def _resolve_for_chain(self, method, batch):
        if isinstance(method, str) and method == "backprop" or self.length < 1:
            return "backprop"
        if isinstance(method, str) and method == AUTO and (
                self.kernels != "numpy" or get_executor(self.backend).runs_task_graphs):
            # measured on the first call's real data (compiled), or decided on its batch between the
            # cluster and backprop on the driver (Ray, Dask); then kept
            return None
        return resolve_schedule(method, self.length, workers=self.workers,
                                blocks=jacobian_shapes(self.chain, batch), backend=self.backend)

    # -- gradients ---------------------------------------------------------
    def grad(self, x, y=None, *, loss=None, params=None, return_trace=False):
        """Per-layer gradients at ``x`` (see :func:`chainprod.grad`).

        Parameters
        ----------
        params : Chain or sequence of tuples, optional
            The parameters to use: a chain of the same structure as the
            plan's (e.g. ``chain.sgd_step(...)``'s result) or one tuple of
            arrays per layer, shaped like ``chain.params``. Default: the
            plan's chain (see :meth:`with_params`).
        """
        value, g, trace = self._value_and_grad(x, y, loss, params, return_trace)
        return (g, trace) if return_trace else g

    def value_and_grad(self, x, y=None, *, loss=None, params=None, return_trace=False):
        """Loss value and per-layer gradients (see :func:`chainprod.value_and_grad`; ``params`` as in :meth:`grad`)."""
        value, g, trace = self._value_and_grad(x, y, loss, params, return_trace)
        return (value, g, trace) if return_trace else (value, g)

    def with_params(self, params) -> Plan:
        """The same plan (schedule, kernels, backend) for other parameters of the same structure, at no planning cost.

        ``params`` is a :class:`~chainprod.Chain` of the same structure (e.g.
        ``chain.sgd_step(...)``'s result) or one tuple of arrays per layer.
        A chain of another structure is a ``ValueError`` naming the first
        layer that differs (a new structure needs ``cp.plan``).
        """
        if params is None:
            raise TypeError("with_params() needs the parameters: a Chain of the same structure or one tuple per layer")
        new = copy.copy(self)
        new.chain = self._chain_for(params)
        new.engine_options = dict(self.engine_options)
        return new

    def _chain_for(self, params):
        """The chain to compute with: the plan's own, or one with ``params`` after checking their structure."""
        if self.chain is None:
            raise TypeError("this plan is for products of matrices (made from a length or shapes); "
                            "use plan.suffix_products(mats), or make a plan from a Chain for gradients")
        if params is None:
            if self.chain.superseded:
                warnings.warn("this plan's chain was replaced by Chain.sgd_step: the gradient is at the old "
                              "parameters; pass params=new_chain, or use plan.with_params(new_chain)",
                              UserWarning, stacklevel=4)
            return self.chain
        if isinstance(params, Chain):
            other = params
        else:
            if isinstance(params, np.ndarray) or not hasattr(params, "__iter__"):
                raise TypeError(f"params must be a Chain or one tuple of arrays per layer, got "
                                f"{type(params).__name__}")
            params = [tuple(ps) for ps in params]
            if len(params) != len(self.chain):
                raise ValueError(f"params has {len(params)} layers but this plan's chain has {len(self.chain)}")
            for l, (ps, layer) in enumerate(zip(params, self.chain)):
                shapes = tuple(np.shape(p) for p in ps)
                if shapes != tuple(p.shape for p in layer.params):
                    raise ValueError(f"params of layer {l} have shapes {shapes}, but layer {l} of this plan's "
                                     f"chain ({layer!r}) has {tuple(p.shape for p in layer.params)}")
            other = self.chain.with_params(params)
        if len(other) != len(self.chain):
            raise ValueError(f"params is a chain of {len(other)} layers but this plan's chain has {len(self.chain)}; "
                             "make a new plan with cp.plan for another structure")
        for l, (mine, theirs) in enumerate(zip(self.chain, other)):
            if mine.run_key() != theirs.run_key():
                raise ValueError(f"params differ in structure from this plan's chain at layer {l}: "
                                 f"{_describe(theirs)} where the plan has {_describe(mine)}; make a new plan "
                                 "with cp.plan for another structure")
        return other

    def _value_and_grad(self, x, y, loss, params, return_trace):
        chain = self._chain_for(params)
        tape, forward_trace = chain_tape(chain, x, self.kernels, backend=self.backend, workers=self.workers,
                                         forward=self.forward, forward_options=self.forward_options)
        value, cotangent = loss_cotangent(tape, y, loss)
        trace = make_trace(return_trace, self.backend, self.workers)
        if trace is None and self.schedule is None:
            trace = make_trace(True, self.backend, self.workers)  # to learn what auto chose
        method = self.method if self.schedule is None else self.schedule
        g = backward(tape, cotangent, method=method, backend=self.backend, workers=self.workers, trace=trace,
                     engine_options=self.engine_options, kernels=self.kernels)
        if self.schedule is None and trace is not None and trace.schedule is not None:
            self.schedule = trace.schedule
        return value, g, add_forward_note(trace, forward_trace)

    # -- products ----------------------------------------------------------
    def suffix_products(self, mats, *, return_trace=False):
        """All suffix products of ``mats`` with the held schedule (see :func:`chainprod.suffix_products`)."""
        self._check_product_length(mats)
        return suffix_products(mats, method=self.schedule, backend=self.backend, workers=self.workers,
                               return_trace=return_trace, engine_options=self.engine_options or None)

    def product(self, mats):
        """The total product of ``mats`` with the held schedule (see :func:`chainprod.product`)."""
        self._check_product_length(mats)
        return product(mats, method=self.schedule, backend=self.backend, workers=self.workers,
                       engine_options=self.engine_options or None)

    def _check_product_length(self, mats):
        if self.chain is not None:
            raise TypeError("this plan is for the gradients of a Chain; make a plan from a length or shapes "
                            "for products of matrices")
        n = len(mats)
        if n != self.length:
            raise ValueError(f"this plan is for {self.length} matrices, got {n}")

    def __repr__(self):
        what = f"chain of {len(self.chain)} layers" if self.chain is not None else f"product of {self.length}"
        runs = ("auto (decided on the first call)" if self.schedule is None else
                self.schedule if isinstance(self.schedule, str) else repr(self.schedule))
        return (f"<Plan for a {what}: runs {runs}; backend={self.backend!r}, workers={self.workers}, "
                f"kernels={self.kernels!r}>")

    def describe(self) -> str:
        """The held schedule's printable summary (rounds, work, flops, Brent bound)."""
        if isinstance(self.schedule, Schedule):
            blocks = jacobian_shapes(self.chain) if self.chain is not None else None
            return str(self.schedule.describe(blocks=blocks, workers=self.workers))
        return repr(self)


def _describe(layer) -> str:
    shapes = ", ".join(str(tuple(p.shape)) for p in layer.params)
    return f"{layer!r} with parameters of shapes {shapes} in {layer.dtype}"


def _product_shapes(target):
    """``(L, blocks)`` for a product plan: an int ``L``, a list of ``(kind, rows, cols)`` or of matrices."""
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if target < 1:
            raise ValueError(f"a product plan needs at least one factor, got L={target}")
        return int(target), None
    if isinstance(target, (list, tuple)) and target and all(
            isinstance(t, tuple) and len(t) == 3 and isinstance(t[0], str) for t in target):
        # (kind, rows, cols) in the user's order: the plan works in scan order (last factor first)
        return len(target), list(reversed(target))
    if isinstance(target, (list, tuple, np.ndarray)):
        seq, _ = read_blocks(target, "mats")
        return len(seq), seq
    raise TypeError(f"plan() takes a Chain, a number of factors, a list of (kind, rows, cols) or a list of "
                    f"matrices; got {type(target).__name__}")


def plan(target, *, method="auto", backend="vectorized", workers=None, kernels=None, batch=1,
         engine_options=None, forward="sequential", forward_options=None) -> Plan:
    """Decide once what runs, and hold it: see :class:`Plan`.

    Parameters
    ----------
    target : Chain, int, list of (kind, rows, cols), or list of matrices
        A chain (for ``plan.grad``) or the factors of a product (for
        ``plan.suffix_products`` / ``plan.product``).
    method, backend, workers, kernels, engine_options, forward, forward_options
        As in :func:`chainprod.grad`; the forward pass (e.g. ``forward="deer"``)
        is held like the method and runs on every gradient of the plan.
    batch : int
        The batch size the cost model plans for (a chain's ``auto`` on the
        numpy reference), >= 1.

    Returns
    -------
    Plan
        ``p.grad(x)`` computes with the chain's parameters;
        ``p.grad(x, params=new_chain)`` or ``p.with_params(new_chain)`` with
        those of a chain of the same structure (after ``sgd_step``).
    """
    return Plan(target, method=method, backend=backend, workers=workers, kernels=kernels, batch=batch,
                engine_options=engine_options, forward=forward, forward_options=forward_options)
