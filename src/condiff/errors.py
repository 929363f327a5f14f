"""Typed errors. Every user-facing failure is a CondiffError with a one-line message that names the bad
value and what is accepted; the CLI prints it on one line and exits with code 2."""

import math
import numbers


class CondiffError(Exception):
    """Base class of every error condiff raises on purpose."""


class ConfigError(CondiffError, ValueError):
    """A bad argument, option or recipe value."""


class NetworkInputError(ConfigError, RuntimeError):
    """Inputs a network's forward refused (PyTorch's RuntimeError, re-raised in one line with the shapes
    involved). Also a RuntimeError, so code that caught PyTorch's error still catches it."""


class InputFileError(CondiffError, OSError):
    """A missing, unreadable, truncated or unsafe input file."""


class OutputFileError(CondiffError, OSError):
    """An output path that cannot be written (a directory, under a regular file, read-only, ...)."""


class NonFiniteError(CondiffError, FloatingPointError):
    """A NaN or inf appeared during sampling or training."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived during a command: the CLI's signal handlers raise it, and ``main`` prints one line
    and exits with 128 + the signal's number. A BaseException, as KeyboardInterrupt is, so no ``except Exception``
    swallows it; unlike KeyboardInterrupt, typer does not turn it into a silent return. ``kept``, set on the way
    out by code that knows (the trainer's CLI: its last checkpoint), says what the command leaves to build on."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
        self.kept: str | None = None


def one_of(kind: str, value, accepted) -> ConfigError:
    """Build the standard 'unknown X' error: names the value and lists what is accepted."""
    return ConfigError(f"unknown {kind} {value!r}; accepted: {', '.join(map(str, accepted))}")


def one_line(message: str) -> str:
    """``message`` with every line break or other control character escaped, so it prints as one line."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in str(message))


def is_real(value) -> bool:
    """A finite real number (not a bool, not NaN or inf)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_real(
    what: str,
    value,
    lo: float = -math.inf,
    hi: float = math.inf,
    accepted: str | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """``value`` as a float when it is a finite real number (not a bool) in [lo, hi] (an open end with
    ``lo_open`` / ``hi_open``); otherwise the one-line ConfigError '{what} must be {accepted}, got {value!r}'."""
    ok = is_real(value) and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not ok:
        if accepted is None:
            ends = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            accepted = "a finite number" + ("" if math.isinf(lo) and math.isinf(hi) else f" in {ends}")
        raise ConfigError(f"{what} must be {accepted}, got {value!r}")
    return float(value)


def check_int(what: str, value, lo: int | None = None, hi: int | None = None, accepted: str | None = None) -> int:
    """``value`` when it is an integer (not a bool) in [lo, hi] (None: unbounded); otherwise a one-line
    ConfigError naming it and the accepted range."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        if accepted is None and lo is not None and hi is not None:
            accepted = f"an integer in [{lo}, {hi}]"
        elif accepted is None and lo is not None:
            accepted = f"an integer >= {lo}"
        elif accepted is None and hi is not None:
            accepted = f"an integer <= {hi}"
        raise ConfigError(f"{what} must be {accepted or 'an integer'}, got {value!r}")
    return int(value)
