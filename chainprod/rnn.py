"""The Elman RNN over time, and its gradients through time by backprop or by a reverse linear recurrence.

One layer, named and shaped as ``torch.nn.RNN`` (``num_layers=1``)::

    h_t = f(W_ih u_t + b_ih + W_hh h_{t-1} + b_hh),    t = 0 .. T-1,    f = tanh or relu

With a loss term at every step, the adjoint ``lambda_t = dloss/dh_t`` obeys

    lambda_t = J_{t+1}^T lambda_{t+1} + g_t,    J_{t+1} = diag(f'(z_{t+1})) W_hh,    g_t = dl/dh_t

(``lambda_{T-1} = g_{T-1}``): an affine recurrence run backwards in time. In
reversed time it is exactly what :func:`chainprod.linear_recurrence`
computes, so any of its scan schedules gives every adjoint; ``"backprop"``
is the plain loop (backprop through time), the baseline. The parameter
gradients then come from the adjoints and the stored states in one batched
pass over ``T`` and ``N``. ``docs/recurrences.md`` has the derivation.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_float_array
from .cost import AUTO, valid_schedules
from .errors import NonFiniteError
from .recurrence import linear_recurrence

__all__ = ["ElmanRNN", "rnn_value_and_grad"]

NONLINEARITIES = ("tanh", "relu")
LOSSES = ("sum", "mse")


class ElmanRNN:
    """A single-layer Elman RNN, ``h_t = f(W_ih u_t + b_ih + W_hh h_{t-1} + b_hh)``.

    Parameters
    ----------
    W_ih : array, (d_h, d_in)
        Input-to-hidden weights (``weight_ih_l0`` of ``torch.nn.RNN``).
    W_hh : array, (d_h, d_h)
        Hidden-to-hidden weights (``weight_hh_l0``).
    b_ih, b_hh : array (d_h,), optional
        The two biases (``bias_ih_l0``, ``bias_hh_l0``); both or neither.
    nonlinearity : {"tanh", "relu"}
    batch_first : bool
        Inputs and outputs ``(N, T, ...)`` instead of ``(T, N, ...)``.

    Notes
    -----
    The parameters are copied: changing the arrays passed in later does not
    change the model, and the model never writes to them. All parameters
    share one dtype (float32 or float64), and inputs must have it too.

    Examples
    --------
    >>> import numpy as np
    >>> import chainprod as cp
    >>> rnn = cp.ElmanRNN(np.eye(2), 0.5 * np.eye(2))
    >>> rnn.forward(np.ones((3, 1, 2)))[:, 0, 0].round(3).tolist()
    [0.762, 0.881, 0.894]
    """

    def __init__(self, W_ih, W_hh, b_ih=None, b_hh=None, nonlinearity="tanh", batch_first=False):
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity: unknown {nonlinearity!r}; use one of {list(NONLINEARITIES)}")
        W_ih = as_float_array(W_ih, "W_ih", ndim=2)
        W_hh = as_float_array(W_hh, "W_hh", ndim=2)
        d_h, d_in = W_ih.shape
        if W_hh.shape != (d_h, d_h):
            raise ValueError(f"W_hh: expected shape (d_h, d_h) = ({d_h}, {d_h}) with d_h from W_ih of shape "
                             f"{W_ih.shape}, got {W_hh.shape}")
        if (b_ih is None) != (b_hh is None):
            raise ValueError("b_ih and b_hh: pass both biases or neither (torch.nn.RNN has both or none)")
        params = {"W_ih": W_ih, "W_hh": W_hh}
        if b_ih is not None:
            for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
                b = as_float_array(b, name, ndim=1)
                if b.shape != (d_h,):
                    raise ValueError(f"{name}: expected shape ({d_h},) (d_h from W_ih of shape {W_ih.shape}), "
                                     f"got {b.shape}")
                params[name] = b
        dtypes = {k: v.dtype for k, v in params.items()}
        if len(set(dtypes.values())) > 1:
            raise TypeError(f"parameters of different dtypes: {dtypes}; pass all in float32 or all in float64")
        # copies, read-only: the model is a value, and nothing the user holds is aliased or written
        self.params = {}
        for k, v in params.items():
            c = np.array(v, copy=True)
            c.flags.writeable = False
            self.params[k] = c
        self.nonlinearity = nonlinearity
        self.batch_first = bool(batch_first)
        self.d_in, self.d_h = d_in, d_h
        self.dtype = W_ih.dtype

    @property
    def bias(self) -> bool:
        """Whether the model has the two biases."""
        return "b_ih" in self.params

    def __repr__(self):
        return (f"ElmanRNN(d_in={self.d_in}, d_h={self.d_h}, nonlinearity={self.nonlinearity!r}, "
                f"bias={self.bias}, batch_first={self.batch_first}, dtype={self.dtype})")

    @classmethod
    def from_torch(cls, module):
        """An :class:`ElmanRNN` with a copy of the parameters of a ``torch.nn.RNN``.

        Parameters
        ----------
        module : torch.nn.RNN
            Single layer (``num_layers=1``), unidirectional, ``proj_size=0``;
            ``bias``, ``nonlinearity`` and ``batch_first`` either way.

        Raises
        ------
        chainprod.errors.UnsupportedModuleError
            Not an ``nn.RNN`` (a GRU or LSTM, say), or an option this class
            cannot represent; the message names the option.
        """
        import torch  # loaded only here: ``import chainprod`` never loads torch

        from .errors import UnsupportedModuleError

        if not isinstance(module, torch.nn.RNN):
            raise UnsupportedModuleError(f"ElmanRNN.from_torch takes a torch.nn.RNN, got "
                                         f"{type(module).__name__}", "", module)
        unsupported = [("num_layers", module.num_layers, 1), ("bidirectional", module.bidirectional, False),
                       ("proj_size", getattr(module, "proj_size", 0), 0)]
        for option, value, ok in unsupported:
            if value != ok:
                raise UnsupportedModuleError(f"nn.RNN with {option}={value!r} is not supported by ElmanRNN "
                                             f"(only {option}={ok!r}); stacked and bidirectional RNNs are not "
                                             "built yet", "", module)

        def grab(name):
            return getattr(module, name).detach().cpu().numpy().copy()

        biases = (grab("bias_ih_l0"), grab("bias_hh_l0")) if module.bias else (None, None)
        return cls(grab("weight_ih_l0"), grab("weight_hh_l0"), *biases, nonlinearity=module.nonlinearity,
                   batch_first=module.batch_first)

    # -- forward ----------------------------------------------------------------------------------------
    def _read_u(self, u):
        shape = np.shape(u)
        layout = "(N, T, d_in)" if self.batch_first else "(T, N, d_in)"
        if len(shape) != 3:
            raise ValueError(f"u: expected shape {layout} with d_in = {self.d_in}, got {shape} (one sequence: "
                             f"add a batch axis of size 1)")
        t_axis = 1 if self.batch_first else 0
        if shape[t_axis] == 0:
            raise ValueError(f"u: has T=0 steps (shape {shape}, layout {layout}); a sequence needs T >= 1")
        if shape[1 - t_axis] == 0:
            raise ValueError(f"u: has N=0 samples (shape {shape}, layout {layout})")
        if shape[2] != self.d_in:
            raise ValueError(f"u: expected d_in = {self.d_in} (from W_ih of shape {self.params['W_ih'].shape}) "
                             f"in the last axis, got shape {shape}")
        arr = as_float_array(u, "u", allow_nonfinite=True)
        if arr.dtype != self.dtype:
            raise TypeError(f"u is {arr.dtype} but the model is {self.dtype}: pass u in the model's dtype")
        arr = arr.transpose(1, 0, 2) if self.batch_first else arr  # a view: time first from here on
        bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        if bad.any():
            t = int(np.flatnonzero(bad)[0])
            n, i = (int(k) for k in np.argwhere(~np.isfinite(arr[t]))[0])
            raise ValueError(f"u: contains NaN or infinity at step t={t} (sample n={n}, feature {i})")
        return arr

    def _read_h0(self, h0, N):
        """``h0`` as ``(N, d_h)``; it may be given as ``(N, d_h)`` or torch's ``(1, N, d_h)``."""
        if h0 is None:
            return np.zeros((N, self.d_h), self.dtype), (N, self.d_h)
        h = as_float_array(h0, "h0", allow_nonfinite=True)
        if h.shape not in ((N, self.d_h), (1, N, self.d_h)):
            raise ValueError(f"h0: expected shape (N, d_h) = ({N}, {self.d_h}) or (1, N, d_h), got {h.shape}")
        if h.dtype != self.dtype:
            raise TypeError(f"h0 is {h.dtype} but the model is {self.dtype}: pass h0 in the model's dtype")
        if not np.isfinite(h).all():
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(h))[0])
            raise ValueError(f"h0: contains NaN or infinity (first at index {bad} of shape {h.shape})")
        return h.reshape(N, self.d_h), h.shape

    def _run(self, u, h):
        """All states ``(T, N, d_h)`` of time-first ``u`` from ``h`` ``(N, d_h)``."""
        p = self.params
        T, N = u.shape[:2]
        # every input projection in one product: only the W_hh term is sequential
        out = np.matmul(u, p["W_ih"].T)
        if self.bias:
            out += p["b_ih"] + p["b_hh"]
        W_hh_T = p["W_hh"].T
        act = np.tanh if self.nonlinearity == "tanh" else _relu
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, with the step
            for t in range(T):
                out[t] += h @ W_hh_T
                act(out[t], out=out[t])
                h = out[t]
        ok = np.isfinite(out.reshape(T, -1)).all(axis=1)
        if not ok.all():
            t = int(np.flatnonzero(~ok)[0])
            raise NonFiniteError(f"state h_t at step t={t} is not finite: the RNN's forward pass overflowed "
                                 "(inputs and parameters are finite)", (0, t))
        return out

    def forward(self, u, h0=None):
        """Every state of the RNN over the sequence ``u``.

        Parameters
        ----------
        u : array, (T, N, d_in)
            The inputs, ``(N, T, d_in)`` with ``batch_first``.
        h0 : array, optional
            The initial state ``(N, d_h)`` (or ``(1, N, d_h)`` as torch
            takes it); zeros by default.

        Returns
        -------
        numpy.ndarray
            The states ``h_0 .. h_{T-1}``, ``(T, N, d_h)`` (``(N, T, d_h)``
            with ``batch_first``): torch's ``output``.

        Raises
        ------
        ValueError
            Wrong shapes (the message names the argument and the shape), a
            NaN or infinity in ``u`` (naming the step) or ``h0``.
        TypeError
            Inputs in a dtype other than the model's.
        chainprod.errors.NonFiniteError
            A state overflowed (``relu`` only); ``layers`` is ``(0, t)``.
        """
        uu = self._read_u(u)
        h, _ = self._read_h0(h0, uu.shape[1])
        out = self._run(uu, h)
        return out.transpose(1, 0, 2).copy() if self.batch_first else out


def _relu(x, out):
    return np.maximum(x, 0, out=out)


def _dact(rnn, H):
    """``f'(z_t)`` from the states ``h_t = f(z_t)``: no need to keep ``z``."""
    if rnn.nonlinearity == "tanh":
        return 1 - H * H
    return (H > 0).astype(H.dtype)  # relu'(0) = 0, as torch takes it


def _loss_terms(rnn, H, y, loss):
    """The loss and ``g_t = dl/dh_t`` for every step, ``(T, N, d_h)``."""
    if loss == "sum":
        if y is not None:
            raise ValueError("loss='sum' takes no targets y (it is the sum of every output); use loss='mse'")
        return float(H.sum(dtype=np.float64)), np.ones_like(H)
    if y is None:
        raise ValueError("loss='mse' needs targets y shaped like the output sequence")
    yy = as_float_array(y, "y", allow_nonfinite=True)
    want = (H.shape[1], H.shape[0], H.shape[2]) if rnn.batch_first else H.shape
    if yy.shape != want:
        layout = "(N, T, d_h)" if rnn.batch_first else "(T, N, d_h)"
        raise ValueError(f"y: expected the output's shape {layout} = {want}, got {yy.shape}")
    if yy.dtype != rnn.dtype:
        raise TypeError(f"y is {yy.dtype} but the model is {rnn.dtype}: pass y in the model's dtype")
    yy = yy.transpose(1, 0, 2) if rnn.batch_first else yy
    bad = ~np.isfinite(yy.reshape(yy.shape[0], -1)).all(axis=1)
    if bad.any():
        raise ValueError(f"y: contains NaN or infinity at step t={int(np.flatnonzero(bad)[0])}")
    diff = H - yy
    value = float(np.mean(diff * diff, dtype=np.float64))
    return value, diff * H.dtype.type(2.0 / diff.size)


def _check_method(method):
    if not isinstance(method, str):
        raise TypeError(f"method must be 'backprop', 'auto' or a scan schedule name, got {method!r}")
    names = valid_schedules()
    if method != "backprop" and method not in names:
        raise ValueError(f"method: unknown {method!r}; use 'backprop', 'auto' or a scan schedule: "
                         f"{[n for n in names if n not in ('tree', AUTO)]}")
    if method == "tree":
        raise ValueError("method 'tree' forms only the total product, not every adjoint; use 'backprop', "
                         "'auto' or a scan schedule such as 'sklansky'")


def _adjoints_bptt(rnn, D, G):
    """Backprop through time, a plain loop: ``delta_t = dloss/dz_t`` for every step."""
    T = G.shape[0]
    W_hh = rnn.params["W_hh"]
    delta = np.empty_like(G)
    lam = G[T - 1].copy()
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            lam = delta[t + 1] @ W_hh  # J_{t+1}^T lambda_{t+1}, one row per sample
            lam += G[t]
        np.multiply(lam, D[t], out=delta[t])
    return delta


def _adjoints_scan(rnn, D, G, method, backend, workers):
    """The adjoints as :func:`chainprod.linear_recurrence` in reversed time, then ``delta_t = f'_t * lambda_t``.

    Reversed step ``s`` holds ``lambda_{T-1-s} = A_s lambda_{T-s} + g_{T-1-s}``
    with ``A_s = J_{T-s}^T = W_hh^T diag(f'(z_{T-s}))``, one dense matrix per
    step and sample (``(T, N, d, d)``: the Jacobian depends on the sample's
    state). Step 0 starts from zero, so ``A_0`` is never used: zeros.
    """
    T, N, d = G.shape
    A = np.zeros((T, N, d, d), G.dtype)
    # A[s, n] = W_hh^T * f'_{T-s}[n] along columns, for s = 1 .. T-1
    A[1:] = rnn.params["W_hh"].T[None, None] * D[:0:-1][:, :, None, :]
    lam_rev = linear_recurrence(A, G[::-1], method=method, backend=backend, workers=workers)
    return lam_rev[::-1] * D


def rnn_value_and_grad(rnn, u, y=None, *, loss="sum", h0=None, method="backprop", backend="vectorized",
                       workers=None):
    """The loss over every step of an :class:`ElmanRNN` and its gradients through time.

    Parameters
    ----------
    rnn : ElmanRNN
    u : array, (T, N, d_in)
        The inputs (``(N, T, d_in)`` with ``rnn.batch_first``).
    y : array, optional
        Targets shaped like the output sequence, for ``loss="mse"``.
    loss : {"sum", "mse"}
        ``"sum"``: the sum of every output (every step, sample and unit),
        torch's ``output.sum()``. ``"mse"``: ``mse_loss(output, y)``, the
        mean over every entry.
    h0 : array, optional
        The initial state ``(N, d_h)`` or ``(1, N, d_h)``; zeros by default.
    method : str
        ``"backprop"`` (the default): backprop through time, a plain numpy
        loop, the baseline. Any scan schedule name of
        :func:`chainprod.valid_schedules` but ``"tree"``, or ``"auto"``: the
        adjoints by :func:`chainprod.linear_recurrence` in reversed time
        (``"sequential"`` is its plain loop over the same affine steps).
    backend, workers
        As in :func:`chainprod.linear_recurrence`; the scan methods only.

    Returns
    -------
    value : float
        The loss.
    grads : dict of numpy.ndarray
        ``"W_ih"``, ``"W_hh"`` and, with biases, ``"b_ih"``, ``"b_hh"``:
        parameter gradients summed over time and batch, shaped like the
        parameters; ``"u"``: ``dloss/du`` shaped like ``u``; ``"h0"``:
        ``dloss/dh0`` shaped like ``h0`` (``(N, d_h)`` when not given). In
        the model's dtype. Nothing passed in is modified.

    Raises
    ------
    ValueError
        Bad shapes, NaN or infinity (naming the step), an unknown loss or
        method, targets missing for ``"mse"`` or given for ``"sum"``.
    TypeError
        Inputs in a dtype other than the model's, or ``rnn`` not an
        :class:`ElmanRNN`.
    chainprod.errors.NonFiniteError
        A state overflowed in the forward pass, or the scan's products of
        Jacobians did.

    Notes
    -----
    A scan forms ``T N`` dense ``d_h x d_h`` blocks and products of them:
    ``d_h^3`` flops per op against backprop's ``d_h^2`` per step; it pays
    only with many workers (``docs/recurrences.md``). float32 runs in
    float32 and agrees with float64 to about ``1e-4`` relative at ``T`` in
    the hundreds (the tests' tolerance).
    """
    if not isinstance(rnn, ElmanRNN):
        raise TypeError(f"rnn must be a chainprod.ElmanRNN, got {type(rnn).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"loss: unknown {loss!r}; use one of {list(LOSSES)}")
    _check_method(method)
    uu = rnn._read_u(u)
    h, h0_shape = rnn._read_h0(h0, uu.shape[1])
    H = rnn._run(uu, h)
    value, G = _loss_terms(rnn, H, y, loss)
    D = _dact(rnn, H)
    if method == "backprop":
        delta = _adjoints_bptt(rnn, D, G)
    else:
        delta = _adjoints_scan(rnn, D, G, method, backend, workers)
    # h_{t-1} for every step: h0, then the states but the last
    H_prev = np.concatenate([h[None], H[:-1]], axis=0)
    p = rnn.params
    grads = {"W_ih": np.einsum("tni,tnj->ij", delta, uu, optimize=True),
             "W_hh": np.einsum("tni,tnj->ij", delta, H_prev, optimize=True)}
    if rnn.bias:
        grads["b_ih"] = delta.sum(axis=(0, 1))
        grads["b_hh"] = grads["b_ih"].copy()
    du = delta @ p["W_ih"]
    grads["u"] = du.transpose(1, 0, 2).copy() if rnn.batch_first else du
    grads["h0"] = (delta[0] @ p["W_hh"]).reshape(h0_shape)
    return value, grads
