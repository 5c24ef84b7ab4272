"""What a Newton forward pass needs from each model: the steps, their values and Jacobians at a guess.

A *problem* is a recurrence ``s_t = f_t(s_{t-1})``, ``t = 0 .. n-1``, of
``N`` lanes with a state of ``S`` numbers and a known start ``s_{-1}``
(:attr:`Problem.h0`). The solver (:mod:`chainprod.newton`) asks it two
things about a guess ``s̄`` of the whole trajectory, for every step at once
(no step waits for another):

* :meth:`Problem.evaluate`: ``f_t(s̄_{t-1})`` of every step, plus what the
  Jacobians need (a *linearisation point*);
* :meth:`Problem.jacobian`: ``J_t = df_t/ds`` at that point, dense
  ``(n, N, S, S)`` or only its diagonal ``(n, N, S)`` (quasi-Newton).

Problems here: the body of a :class:`~chainprod.layers.Chain` (layers of
one width, :class:`ChainBody`), one layer of an RNN, GRU or LSTM over time
(:class:`CellLayer`; the LSTM's state is ``(h, c)``, ``S = 2H``), and the
state recurrence of a :class:`~chainprod.ssm.DiagonalRecurrence`
(:class:`DiagonalStates`, linear: its Jacobian is ``diag(a)`` everywhere).
"""

from __future__ import annotations

import numpy as np

from .activations import apply_activation, derivative_from_output
from .kernels.cell_jacobians import cell_jacobian
from .layers import Chain, Dense, Diagonal

__all__ = ["Problem", "ChainBody", "CellLayer", "DiagonalStates", "split_chain", "previous", "lyapunov_exponent"]


def previous(h0, x):
    """``s_{t-1}`` of every step: ``h0``, then every state but the last, ``(n, N, S)``."""
    return np.concatenate([h0[None], x[:-1]], axis=0)


class Problem:
    """The interface the solver uses; see the module docstring.

    Attributes
    ----------
    n, N, S : int
        Steps, lanes (batch), state size.
    h0 : ndarray, (N, S)
        The known state before step 0.
    diagonal : bool
        Every Jacobian is diagonal: the solver uses diagonal blocks for
        every method (DEER and quasi-DEER coincide).
    linear : bool
        The steps are affine: one exact Newton step solves them.
    """

    n = N = S = 0
    h0 = None
    diagonal = False
    linear = False
    #: what a step is called in messages ("layer", "step t=")
    unit = "step"

    def where(self, t) -> str:
        """Step ``t`` as messages name it."""
        return f"{self.unit} {t}"

    def evaluate(self, prev):  # pragma: no cover - every problem defines it
        """``(F, point)``: ``F[t] = f_t(prev[t])`` ``(n, N, S)`` and what :meth:`jacobian` needs."""
        raise NotImplementedError

    def jacobian(self, point, diag):  # pragma: no cover
        """``J_t`` at ``point``: ``(n, N, S, S)``, or its diagonal ``(n, N, S)`` when ``diag``."""
        raise NotImplementedError


# -- chains --------------------------------------------------------------------------------------------
def split_chain(chain: Chain):
    """``(head, start, stop, readout)``: the layers a Newton solve covers are ``start .. stop - 1``.

    A first layer that changes the width (``d_0 -> w``) is the *head*: its
    input is known, so it runs directly. A last layer that changes the width
    (``w -> d_L``) is the *readout*, run once the solve is done. Every layer
    in between must map ``w -> w``: a state recurrence has one state size.

    Raises
    ------
    ValueError
        Naming the first layer in between whose width differs.
    """
    layers = chain.layers
    L = len(layers)
    head = layers[0].d_in != layers[0].d_out
    start = 1 if head else 0
    if start == L:
        return head, start, start, False
    w = layers[start].d_in
    readout = layers[-1].d_out != w
    stop = L - 1 if readout else L
    for l in range(start, stop):
        if layers[l].d_in != w or layers[l].d_out != w:
            raise ValueError(
                f"a Newton forward pass solves the layers as one recurrence of width w = {w}: layer {l} maps "
                f"{layers[l].d_in} -> {layers[l].d_out}. Only the first layer (d_0 -> w) and the last layer "
                "(w -> d_L) may change the width; use method='sequential' for this chain")
    return head, start, stop, readout


class ChainBody(Problem):
    """Layers ``start .. stop - 1`` of a chain, all ``w -> w``, as ``n = stop - start`` steps."""

    unit = "layer"

    def __init__(self, chain: Chain, start: int, stop: int, h0):
        self.chain, self.offset = chain, start  # the compiled kernels read the chain's packing
        self.n, (self.N, self.S) = stop - start, h0.shape
        self.h0 = h0
        # the chain's runs inside [start, stop): runs never straddle the head or the readout (other shapes)
        self.runs = [r for r in chain.runs if start <= r.start < stop]
        self.diagonal = all(r.cls is Diagonal for r in self.runs)
        self.linear = all(r.activation == "identity" for r in self.runs)

    def where(self, t) -> str:
        return f"layer {self.offset + t}"

    def evaluate(self, prev):
        F = np.empty_like(prev)
        for r in self.runs:
            i = r.start - self.offset
            p, out = prev[i:i + r.count], F[i:i + r.count]
            if r.cls is Dense:
                W, b = r.params
                np.matmul(p, np.swapaxes(W, 1, 2), out=out)
            else:
                W, b = r.params
                np.multiply(p, W[:, None], out=out)
            out += b[:, None]
            apply_activation(r.activation, out)
        return F, F

    def jacobian(self, F, diag):
        n, N, w = self.n, self.N, self.S
        J = np.zeros((n, N, w) if diag or self.diagonal else (n, N, w, w), F.dtype)
        for r in self.runs:
            i = r.start - self.offset
            Y = F[i:i + r.count]
            S = (np.ones_like(Y) if r.activation == "identity" else derivative_from_output(r.activation, Y))
            W = r.params[0]
            if r.cls is Diagonal:
                if J.ndim == 3:
                    np.multiply(S, W[:, None], out=J[i:i + r.count])
                else:
                    k = np.arange(w)
                    J[i:i + r.count, :, k, k] = S * W[:, None]
            elif J.ndim == 3:
                J[i:i + r.count] = S * np.diagonal(W, axis1=1, axis2=2)[:, None]
            else:
                np.multiply(S[..., None], W[:, None], out=J[i:i + r.count])  # diag(act') W
        return J


# -- recurrent cells -----------------------------------------------------------------------------------
def _sigmoid(a):
    # exp(-a) overflows to inf for a very negative a, and 1 / (1 + inf) = 0 is the right limit
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-a))


class CellLayer(Problem):
    """One layer of an RNN / GRU / LSTM over ``T`` steps, from its input projections ``X``.

    The cells' equations are those of :mod:`chainprod.kernels.recurrent_numpy`
    (torch's gate order), evaluated for every step at once from a guess of
    the previous states; the Jacobians are those of
    :func:`chainprod.recurrent_grad.state_jacobians`, taken here at the guess
    (that function reads ``h_{t-1}`` and ``c_{t-1}`` from the trajectory
    it is given, which a guess is not: the few lines are repeated).
    """

    def __init__(self, cell, X, W_hh, b_hh, h0, c0, layer):
        self.cell, self.X, self.W, self.b = cell, X, W_hh, b_hh
        self.layer = layer
        T, N, _ = X.shape
        H = W_hh.shape[1]
        self.H, self.n, self.N = H, T, N
        self.lstm = cell == "lstm"
        self.S = 2 * H if self.lstm else H
        self.h0 = np.concatenate([h0, c0], axis=1) if self.lstm else np.ascontiguousarray(h0)

    def where(self, t) -> str:
        return f"step t={t} of layer {self.layer}"

    def evaluate(self, prev):
        H, X = self.H, self.X
        hp = prev[..., :H]
        gh = hp @ self.W.T + self.b  # (T, N, G*H): every step's recurrent projection in one product
        with np.errstate(over="ignore", invalid="ignore"):  # a relu state may overflow: the solver reports it
            if self.cell == "rnn_tanh":
                F = np.tanh(X + gh)
                return F, (F,)
            if self.cell == "rnn_relu":
                F = np.maximum(X + gh, 0)
                return F, (F,)
            if self.cell == "gru":
                r = _sigmoid(X[..., :H] + gh[..., :H])
                z = _sigmoid(X[..., H:2 * H] + gh[..., H:2 * H])
                ghn = gh[..., 2 * H:]
                n = np.tanh(X[..., 2 * H:] + r * ghn)
                F = (1 - z) * n + z * hp
                return F, (hp, r, z, n, ghn)
            a = X + gh
            i, f = _sigmoid(a[..., :H]), _sigmoid(a[..., H:2 * H])
            g, o = np.tanh(a[..., 2 * H:3 * H]), _sigmoid(a[..., 3 * H:])
            cp_ = prev[..., H:]
            c = f * cp_ + i * g
            tc = np.tanh(c)
            F = np.concatenate([o * tc, c], axis=-1)
            return F, (cp_, i, f, g, o, tc)

    def kernel_tape(self, states):
        """``(Hs, Z)`` of solved ``states`` ``(T, N, S)``, laid out as a recurrent kernel set's ``forward``
        returns them (:mod:`chainprod.kernels.recurrent_numpy`), for its ``backward``."""
        H = self.H
        _, point = self.evaluate(previous(self.h0, states))
        Hs = np.ascontiguousarray(states[..., :H])
        if self.cell in ("rnn_tanh", "rnn_relu"):
            return Hs, np.empty(Hs.shape[:2] + (0,), Hs.dtype)
        if self.cell == "gru":
            return Hs, np.concatenate(point[1:], axis=-1)  # [r, z, n, gh_n]
        return Hs, np.concatenate([*point[1:5], states[..., H:]], axis=-1)  # [i, f, g, o, c_t]

    def jacobian(self, point, diag):
        return cell_jacobian(self.cell, self.W, self.H, point, diag)


class DiagonalStates(Problem):
    """The states of a :class:`~chainprod.ssm.DiagonalRecurrence`: ``h_t = a * h_{t-1} + (B u)_t``."""

    diagonal = True
    linear = True

    def __init__(self, a, Bu, h0):
        self.a, self.Bu, self.h0 = a, Bu, h0
        self.n, self.N, self.S = Bu.shape

    def evaluate(self, prev):
        F = prev * self.a
        F += self.Bu
        return F, None

    def jacobian(self, point, diag):
        return np.broadcast_to(self.a, (self.n, self.N, self.S))


def lyapunov_exponent(problem, states, *, seed=0):
    """An estimate of the largest Lyapunov exponent of ``problem`` along the trajectory ``states``.

    The mean growth per step, ``(1/n) log |J_n ... J_1 v| / |v|``, of a
    random tangent vector ``v`` under the step Jacobians taken along
    ``states`` (the sequential trajectory), averaged over the lanes. Below
    0 the steps contract on average (Newton iterations converge in few
    steps); above 0 products of Jacobians grow like ``exp(n lambda)``
    (undamped Newton overflows: ``docs/newton.md``). A linear diagonal
    recurrence ``s_t = a s_{t-1} + b_t`` with one ``a`` gives ``log |a|``.

    Parameters
    ----------
    problem : Problem
        The steps (:class:`ChainBody`, :class:`CellLayer`, :class:`DiagonalStates`).
    states : ndarray, (n, N, S)
        The trajectory, ``states[t]`` the state after step ``t``.
    seed : int
        For the random tangent vector.

    Returns
    -------
    float
        Natural log per step; ``-inf`` when a product of Jacobians is
        exactly 0 (e.g. a relu unit that is off everywhere).

    Notes
    -----
    The Jacobians of every step are formed at once: ``n N S^2`` numbers.
    """
    n, N, S = problem.n, problem.N, problem.S
    if n == 0:
        raise ValueError("lyapunov_exponent: the problem has no steps")
    if states.shape != (n, N, S):
        raise ValueError(f"states: expected shape {(n, N, S)} (steps, lanes, state), got {states.shape}")
    _, point = problem.evaluate(previous(problem.h0, states))
    J = problem.jacobian(point, False)
    v = np.random.default_rng(seed).standard_normal((N, S))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    total = np.zeros(N)
    with np.errstate(divide="ignore", invalid="ignore"):
        for t in range(n):
            v = J[t] * v if J.ndim == 3 else np.matmul(J[t], v[..., None])[..., 0]
            g = np.linalg.norm(v, axis=1)
            total += np.log(g)
            v /= np.where(g > 0, g, 1.0)[:, None]  # renormalised every step: the product would under/overflow
    return float(np.mean(total) / n)
