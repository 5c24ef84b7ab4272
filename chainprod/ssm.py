"""The diagonal linear recurrence layer (state-space style), and its gradients through time.

::

    h_t = a * h_{t-1} + B u_t,      y_t = C h_t + D u_t,      t = 0 .. T-1,      h_{-1} = h0

with a real diagonal ``a`` (``*`` is elementwise): a state-space layer with a
time-invariant real diagonal transition. ``cp.grad`` /
``cp.value_and_grad`` take it through ``__chainprod_value_and_grad__``; the
gradients through time (compiled loops, or scans by
:func:`chainprod.linear_recurrence`) are in :mod:`chainprod.ssm_grad`, the
math and the costs in ``docs/recurrences.md``.
"""

from __future__ import annotations

import numpy as np

from . import ssm_array
from ._validate import as_float_array
from .arrays import is_foreign
from .ssm_grad import outputs, read_h0, read_u, run_states, to_layout, value_and_grad
from .tape import resolve_kernels

__all__ = ["DiagonalRecurrence"]


class DiagonalRecurrence:
    """A diagonal linear recurrence layer, ``h_t = a * h_{t-1} + B u_t``, ``y_t = C h_t + D u_t``.

    Parameters
    ----------
    a : array, (d,)
        The diagonal of the state transition (real; ``|a| < 1`` keeps the
        states bounded, larger values are allowed and overflow is reported).
    B : array, (d, d_in)
        Input to state.
    C : array, (d_out, d)
        State to output.
    D : array, (d_out, d_in), optional
        Feedthrough; ``None`` (the default) for none.
    batch_first : bool
        Inputs and outputs ``(N, T, ...)`` instead of ``(T, N, ...)``.

    Notes
    -----
    The parameters are copied and kept read-only, in one dtype (float32 or
    float64) that inputs must share. ``cp.grad`` / ``cp.value_and_grad``
    take the layer (``x`` is the input sequence) and return a dict with
    ``"a"``, ``"B"``, ``"C"`` (and ``"D"``), plus ``"input"`` and ``"h0"``
    with ``with_inputs=True``.

    Examples
    --------
    >>> import numpy as np, chainprod as cp
    >>> layer = cp.DiagonalRecurrence.random(3, 4, 2, seed=0)
    >>> u = np.ones((5, 1, 3))
    >>> layer.forward(u).shape
    (5, 1, 2)
    >>> value, g = cp.value_and_grad(layer, u, loss="sum", method="backprop")
    >>> sorted(g)
    ['B', 'C', 'D', 'a']
    """

    def __init__(self, a, B, C, D=None, *, batch_first=False):
        arrays = {"a": as_float_array(a, "a", ndim=1), "B": as_float_array(B, "B", ndim=2),
                  "C": as_float_array(C, "C", ndim=2)}
        if D is not None:
            arrays["D"] = as_float_array(D, "D", ndim=2)
        d = arrays["a"].shape[0]
        d_in, d_out = arrays["B"].shape[1], arrays["C"].shape[0]
        want = {"B": (d, d_in), "C": (d_out, d), "D": (d_out, d_in)}
        for name, arr in arrays.items():
            if name != "a" and arr.shape != want[name]:
                raise ValueError(f"{name}: expected shape {want[name]} (d = {d} from a of shape {arrays['a'].shape}, "
                                 f"d_in = {d_in} from B, d_out = {d_out} from C), got {arr.shape}")
        dtypes = {arr.dtype for arr in arrays.values()}
        if len(dtypes) > 1:
            said = ", ".join(f"{k} is {v.dtype}" for k, v in arrays.items())
            raise TypeError(f"parameters must share one dtype (float32 or float64): {said}")
        self.params = {}
        for name, arr in arrays.items():
            copy = np.array(arr, order="C", copy=True)
            copy.setflags(write=False)
            self.params[name] = copy
        self.d, self.d_in, self.d_out = d, d_in, d_out
        self.dtype = dtypes.pop()
        self.batch_first = bool(batch_first)

    @classmethod
    def random(cls, d_in, d, d_out, *, seed=None, dtype=np.float64, feedthrough=True, batch_first=False):
        """A layer with random parameters: ``a`` uniform in ``(-0.99, 0.99)``, matrices scaled by ``1/sqrt(fan_in)``.

        Parameters
        ----------
        d_in, d, d_out : int
            Input, state and output widths.
        seed : int or numpy.random.Generator, optional
        dtype : float32 or float64
        feedthrough : bool
            Whether the layer has ``D``.
        batch_first : bool
        """
        rng = np.random.default_rng(seed)
        a = rng.uniform(-0.99, 0.99, d)
        B = rng.standard_normal((d, d_in)) / np.sqrt(d_in)
        C = rng.standard_normal((d_out, d)) / np.sqrt(d)
        D = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in) if feedthrough else None
        cast = [None if p is None else p.astype(dtype) for p in (a, B, C, D)]
        return cls(*cast, batch_first=batch_first)

    @property
    def has_feedthrough(self) -> bool:
        return "D" in self.params

    def __repr__(self):
        return (f"DiagonalRecurrence(d_in={self.d_in}, d={self.d}, d_out={self.d_out}, "
                f"feedthrough={self.has_feedthrough}, batch_first={self.batch_first}, dtype={self.dtype})")

    def forward(self, u, h0=None, *, return_states=False):
        """The output sequence (and, with ``return_states``, every state).

        Parameters
        ----------
        u : array, (T, N, d_in)
            The inputs, ``(N, T, d_in)`` with ``batch_first``.
        h0 : array, optional
            The state before step 0, ``(N, d)`` or ``(d,)``; zeros by default.
        return_states : bool
            Also return the states ``h_0 .. h_{T-1}``.

        Returns
        -------
        y : numpy.ndarray, (T, N, d_out)
            ``(N, T, d_out)`` with ``batch_first``; with ``return_states`` a
            pair ``(y, h)``, ``h`` shaped ``(T, N, d)`` (or batch first).

        Raises
        ------
        ValueError
            Wrong shapes (naming the argument and its shape), a NaN or
            infinity in ``u`` (naming the step) or ``h0``.
        TypeError
            Inputs in a dtype other than the layer's.
        chainprod.errors.NonFiniteError
            A state or output overflowed; ``layers`` is ``(0, t)``.
        """
        if is_foreign(u, h0):  # torch, JAX or CuPy arrays: computed in their library, on their device
            return ssm_array.forward(self, u, h0, return_states=return_states)
        uu = read_u(self, u)
        h, _ = read_h0(self, h0, uu.shape[1])
        H = run_states(self, uu, h, resolve_kernels(None))
        y = outputs(self, uu, H)
        return (to_layout(self, y), to_layout(self, H)) if return_states else to_layout(self, y)

    def __chainprod_value_and_grad__(self, x, y=None, *, loss=None, method="auto", backend="vectorized",
                                     workers=None, return_trace=False, engine_options=None, kernels=None,
                                     h0=None, with_inputs=False, forward="sequential", forward_options=None):
        """What ``cp.value_and_grad(layer, x, ...)`` runs: :func:`chainprod.ssm_grad.value_and_grad`.

        Torch, JAX or CuPy inputs run in their library, on their device
        (:func:`chainprod.ssm_array.value_and_grad`).
        """
        run = ssm_array.value_and_grad if is_foreign(x, y, h0) else value_and_grad
        return run(self, x, y, loss=loss, method=method, backend=backend, workers=workers, return_trace=return_trace,
                   engine_options=engine_options, kernels=kernels, h0=h0, with_inputs=with_inputs, forward=forward,
                   forward_options=forward_options)
