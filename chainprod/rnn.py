"""Deprecated: the single-layer ``ElmanRNN`` and ``rnn_value_and_grad``, now :class:`chainprod.RNN`.

Both still work for one release and warn with a ``DeprecationWarning``
saying what replaces them:

* ``cp.ElmanRNN(W_ih, W_hh, b_ih, b_hh, nonlinearity, batch_first)`` ->
  ``cp.RNN.from_params({"weight_ih_l0": W_ih, ...}, nonlinearity=..., batch_first=...)``;
* ``cp.rnn_value_and_grad(rnn, u, y, loss=..., h0=..., method=...)`` ->
  ``cp.value_and_grad(rnn, u, y, loss=..., h0=..., method=..., with_inputs=True)``, whose
  gradients carry torch's names (``weight_ih_l0`` for ``W_ih``, ``input`` for ``u``).
"""

from __future__ import annotations

import warnings

from .recurrent import RNN

__all__ = ["ElmanRNN", "rnn_value_and_grad"]

# the old gradient names -> the new ones
_NAMES = {"W_ih": "weight_ih_l0", "W_hh": "weight_hh_l0", "b_ih": "bias_ih_l0", "b_hh": "bias_hh_l0",
          "u": "input", "h0": "h0"}


class ElmanRNN(RNN):
    """Deprecated: a one-layer :class:`chainprod.RNN` built from ``W_ih, W_hh, b_ih, b_hh``.

    ``forward(u, h0)`` returns the output sequence alone, as it did; use
    :meth:`chainprod.RNN.from_params` and ``RNN.forward`` (which returns
    ``(output, h_n)`` as torch does).
    """

    def __init__(self, W_ih, W_hh, b_ih=None, b_hh=None, nonlinearity="tanh", batch_first=False):
        warnings.warn("cp.ElmanRNN is deprecated; use cp.RNN.from_params({'weight_ih_l0': W_ih, 'weight_hh_l0': "
                      "W_hh, 'bias_ih_l0': b_ih, 'bias_hh_l0': b_hh}, nonlinearity=..., batch_first=...)",
                      DeprecationWarning, stacklevel=2)
        if (b_ih is None) != (b_hh is None):
            raise ValueError("b_ih and b_hh: pass both biases or neither (torch.nn.RNN has both or none)")
        params = {"weight_ih_l0": W_ih, "weight_hh_l0": W_hh}
        if b_ih is not None:
            params.update(bias_ih_l0=b_ih, bias_hh_l0=b_hh)
        self._setup(params, bool(batch_first), {"nonlinearity": nonlinearity})

    def forward(self, u, h0=None, *, kernels=None):
        """The output sequence alone (``RNN.forward(u, h0)[0]``)."""
        return super().forward(u, h0, kernels=kernels)[0]


def rnn_value_and_grad(rnn, u, y=None, *, loss="sum", h0=None, method="backprop", backend="vectorized",
                       workers=None):
    """Deprecated: ``cp.value_and_grad(rnn, u, y, ..., with_inputs=True)`` with the old gradient names.

    Returns ``(value, grads)`` with ``"W_ih"``, ``"W_hh"``, ``"b_ih"``,
    ``"b_hh"``, ``"u"`` and ``"h0"``, as before.
    """
    warnings.warn("cp.rnn_value_and_grad is deprecated; use cp.value_and_grad(model, u, y, ..., with_inputs=True) "
                  "(gradients named as torch names the parameters; 'input' for u)", DeprecationWarning, stacklevel=2)
    if not isinstance(rnn, RNN) or rnn.num_layers != 1:
        raise TypeError(f"rnn must be a one-layer chainprod.RNN, got {rnn!r}")
    value, grads = rnn.__chainprod_value_and_grad__(u, y, loss=loss, method=method, backend=backend,
                                                    workers=workers, h0=h0, with_inputs=True)
    if h0 is None:
        grads["h0"] = grads["h0"][0]  # (N, d_h), as before
    return value, {old: grads[new] for old, new in _NAMES.items() if new in grads}
