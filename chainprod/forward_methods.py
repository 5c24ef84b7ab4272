"""Which forward pass a gradient runs on: the sequential pass, or a registered parallel one.

``cp.grad(model, x, ..., forward="deer", forward_options={"tol": 1e-10})``
(and ``value_and_grad``, ``torch_backward``) runs the forward pass by a
solver registered here under its name, then the backward pass the caller
asked for on the tape that solver returns. The Newton solvers
(:mod:`chainprod.newton`: ``"deer"``, ``"quasi_deer"``, ``"elk"``,
``"quasi_elk"``) register themselves when imported, and ``import chainprod``
imports them. The gradient code sits below them in the module stack: it asks
this registry by name instead of importing them.

A solver is ``fn(model, x, *, h0, kernels, **options) -> (tape, trace)``
where ``tape`` is what the model's backward pass reads:

* a :class:`~chainprod.layers.Chain`: ``x`` as :func:`chainprod.tape.forward`
  takes it; a :class:`~chainprod.tape.Tape`;
* an RNN / GRU / LSTM: ``x`` the checked time-first input ``(T, N, d)``,
  ``h0`` the pair ``(h0, c0)`` of ``(num_layers, N, H)`` arrays (``c0``
  None but for an LSTM); per layer ``(u, X, Hs, Z)`` as the model's own
  pass keeps it (``X`` the input projections, ``(Hs, Z)`` as a recurrent
  kernel set's ``forward`` returns them);
* a :class:`~chainprod.ssm.DiagonalRecurrence`: ``x`` the checked inputs
  ``(T, N, d_in)``, ``h0`` ``(N, d)``; the states ``(T, N, d)``.

``tape`` is None when the solver handed the run to the sequential pass
(``fallback="sequential"``): the model's own pass then runs, and the trace
says so.
"""

from __future__ import annotations

from .kernels import unpack_grads
from .tape import forward as tape_forward

__all__ = ["FORWARD_METHODS", "FORWARD_OPTIONS", "register_forward_method", "valid_forward_methods",
           "check_forward", "gradient_tape", "chain_tape", "add_forward_note"]

#: forward method name -> solver (``None``: the model's own sequential pass)
FORWARD_METHODS: dict = {"sequential": None}
#: the keys ``forward_options`` may hold (what :func:`chainprod.newton.newton_forward` takes)
FORWARD_OPTIONS = ("tol", "max_iter", "schedule", "damping", "fallback", "init", "backend", "workers",
                   "engine_options")


def register_forward_method(name, fn):
    """Register ``fn`` as the forward pass named ``name`` (see the module docstring for its contract)."""
    if not isinstance(name, str) or not name or name == "sequential":
        raise ValueError(f"name must be a non-empty str other than 'sequential', got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    FORWARD_METHODS[name] = fn


def valid_forward_methods() -> tuple:
    """The registered forward method names, ``"sequential"`` first."""
    return tuple(FORWARD_METHODS)


def check_forward(forward, forward_options):
    """``(forward, options)`` checked: a registered name, and a dict of known options (or ``{}``).

    Raises
    ------
    ValueError
        An unknown forward name (listing the valid ones), options with the
        sequential forward, or an unknown option key.
    TypeError
        ``forward_options`` not a dict.
    """
    if not isinstance(forward, str) or forward not in FORWARD_METHODS:
        raise ValueError(f"forward: unknown forward method {forward!r}; valid forward methods: "
                         f"{', '.join(valid_forward_methods())}")
    if forward_options is None:
        return forward, {}
    if not isinstance(forward_options, dict):
        raise TypeError(f"forward_options must be a dict (or None), got {type(forward_options).__name__}")
    if forward == "sequential" and forward_options:
        raise ValueError(f"forward_options {sorted(forward_options)} are for a parallel forward pass: pass "
                         f"forward= one of {', '.join(valid_forward_methods()[1:])}; the default "
                         "forward='sequential' takes none")
    unknown = sorted(set(forward_options) - set(FORWARD_OPTIONS))
    if unknown:
        raise ValueError(f"forward_options: unknown key(s) {unknown}; valid keys: {', '.join(FORWARD_OPTIONS)}")
    return forward, dict(forward_options)


def gradient_tape(model, x, *, forward, forward_options, h0=None, kernels=None, backend="vectorized",
                  workers=None):
    """``(tape, trace)`` of the registered ``forward`` (the module docstring says what ``tape`` is).

    ``(None, None)`` for ``forward="sequential"``; ``tape`` None (and a
    trace) when the solver fell back to the sequential pass. The solver's
    scans run on the gradient's ``backend`` and ``workers`` unless
    ``forward_options`` names its own.
    """
    forward, options = check_forward(forward, forward_options)
    if forward == "sequential":
        return None, None
    options.setdefault("backend", backend)
    options.setdefault("workers", workers)
    return FORWARD_METHODS[forward](model, x, h0=h0, kernels=kernels, **options)


def chain_tape(chain, x, kernels=None, packed=None, backend="vectorized", workers=None, *, forward="sequential",
               forward_options=None):
    """``(tape, trace)`` of a :class:`~chainprod.layers.Chain`: its sequential pass, or the registered ``forward``.

    ``packed`` (parameter values held outside the chain, as the torch
    adapter keeps them) is read by the sequential pass directly; a parallel
    pass runs on a chain holding those values. ``trace`` is None for the
    sequential pass.
    """
    forward, options = check_forward(forward, forward_options)
    if forward == "sequential":
        return tape_forward(chain, x, kernels=kernels, packed=packed), None
    if packed is not None:
        chain = chain.with_params(unpack_grads(packed, packed.theta))
    tape, trace = gradient_tape(chain, x, forward=forward, forward_options=options, kernels=kernels,
                                backend=backend, workers=workers)
    return (tape_forward(chain, x, kernels=kernels) if tape is None else tape), trace


def add_forward_note(trace, forward_trace):
    """Append what the forward pass did (iterations, final residual, fallback) to ``trace.note``."""
    if trace is None or forward_trace is None:
        return trace
    ft = forward_trace
    if getattr(ft, "fallback", False):
        said = f"forward {ft.method!r}: {ft.note}"
    else:
        res = ft.residuals[-1] if ft.residuals else (ft.initial_residuals[-1] if ft.initial_residuals else 0.0)
        said = (f"forward {ft.method!r}: {ft.iterations} Newton iteration(s), final scaled residual {res:.3g} "
                f"(tol {ft.tol:.3g}, schedule {ft.schedule or 'none'})")
    trace.note = f"{trace.note}; {said}" if trace.note else said
    return trace
