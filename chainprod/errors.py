"""Every exception chainprod raises on purpose, in one place.

Catch these by class; each says what went wrong and where (the layer range,
the option and its valid values, the backend and task).

>>> import chainprod as cp
>>> issubclass(cp.errors.NonFiniteError, ValueError)
True
"""

from __future__ import annotations

__all__ = ["first_line", "NonFiniteError", "ScheduleError", "DistributedError", "DistributedTimeoutError",
           "ClusterConnectionError", "GradientCheckError", "UnsupportedModuleError", "ConvergenceError"]


class NonFiniteError(FloatingPointError, ValueError):
    """A product of finite Jacobians overflowed or produced NaN.

    ``layers`` is the ``(first, last)`` range (0-based, inclusive) whose
    product first went non-finite.
    """

    def __init__(self, message, layers=None):
        super().__init__(message)
        self.layers = layers


class ScheduleError(ValueError):
    """A schedule breaks one of the rules (raised by ``Schedule.validate``)."""


class DistributedError(RuntimeError):
    """A distributed run failed for a reason outside the numbers (a worker died, a task was lost)."""

    def __init__(self, message, backend=None, task=None):
        super().__init__(message)
        self.backend = backend
        self.task = task


class DistributedTimeoutError(DistributedError, TimeoutError):
    """A distributed run did not finish within ``timeout`` seconds."""


class ClusterConnectionError(DistributedError, ConnectionError):
    """The cluster at ``address`` could not be reached or started."""


class GradientCheckError(AssertionError):
    """Analytic and numerical gradients disagree (raised by ``testing.assert_grads_close``)."""


class UnsupportedModuleError(ValueError):
    """A torch model, or one of its modules, that chainprod cannot represent exactly.

    ``where`` is the module's position as a string (``"1.2"`` = ``model[1][2]``,
    ``""`` = the model itself) and ``module`` the offending module.
    """

    def __init__(self, message, where=None, module=None):
        super().__init__(message)
        self.where = where
        self.module = module


class ConvergenceError(ArithmeticError):
    """An iterative solve (a Newton forward pass) did not reach its tolerance within ``max_iter`` iterations.

    ``residual`` is the last scaled residual, ``iterations`` the number of
    iterations run, ``tol`` the tolerance and ``trace`` the solver's trace
    (iterations and residuals so far).
    """

    def __init__(self, message, residual=None, iterations=None, tol=None, trace=None):
        super().__init__(message)
        self.residual = residual
        self.iterations = iterations
        self.tol = tol
        self.trace = trace


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty).

    Engine errors carry long remote tracebacks; chainprod's own messages quote
    only this line and chain the full exception.
    """
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
