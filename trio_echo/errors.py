"""The one exception tree of trio_echo (stdlib only).

Every error trio_echo raises on purpose derives from :class:`TrioEchoError`. The CLI maps the tree to exit
codes at a single boundary: :class:`ConfigError` and :class:`AddressError` are usage errors (exit 2),
:class:`SupervisorGaveUp` is a runtime failure (exit 1).
"""

from __future__ import annotations

import reprlib

# A config value quoted in an error: a deeply nested or huge value must not turn the one-line error
# into a page (or a RecursionError while rendering it).
_VALUE_REPR = reprlib.Repr()
_VALUE_REPR.maxlevel = 2
_VALUE_REPR.maxstring = 60
_VALUE_REPR.maxother = 60
_VALUE_REPR.maxlong = 40
_VALUE_REPR.maxlist = _VALUE_REPR.maxtuple = _VALUE_REPR.maxdict = 4


def describe_value(value: object) -> str:
    """``repr(value)``, shortened to fit in a one-line error."""
    return _VALUE_REPR.repr(value)


class TrioEchoError(Exception):
    """Base class of every error trio_echo raises on purpose."""


class ConfigError(TrioEchoError):
    """A configuration value is missing, of the wrong type or out of range.

    ``key`` is the dotted path of the offending key (``limits.idle_timeout``, ``server.listen[1]``) so
    the one-line message can name it; ``value`` is the value as given (shortened in the message).
    The message is always one line.
    """

    def __init__(self, key: str, value: object, problem: str) -> None:
        self.key = key
        self.value = value
        self.problem = problem
        text = f"{key} = {describe_value(value)}: {problem}" if key else problem
        super().__init__(" ".join(text.splitlines()))


class AddressError(ValueError, TrioEchoError):
    """An ADDR string (``HOST:PORT``, ``[V6]:PORT``, ``:PORT``, ``unix:/path``) is malformed."""


class ListenerError(TrioEchoError):
    """A listening socket could not be opened or adopted (port taken, stale path in use, ...)."""


class SupervisorGaveUp(TrioEchoError):
    """A supervisor exceeded its restart intensity and escalated.

    Raised ``from`` the failure of the child that broke the budget, after every other child was stopped.
    """

    def __init__(self, child: str, max_restarts: int, period: float, last_failure: str = "") -> None:
        self.child = child
        self.max_restarts = max_restarts
        self.period = period
        because = f"; last failure: {last_failure}" if last_failure else ""
        super().__init__(
            f"supervisor gave up: child {child!r} needed more than {max_restarts} restarts "
            f"in {period:g} s{because}"
        )


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside ``error``, exception groups (nested any deep) flattened; ``[error]`` for
    a plain exception. The one unwrapper of the package (nurseries wrap what their tasks raise)."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]
