"""Typed errors. Every user-facing failure is a CondiffError with a one-line message that names the bad
value and what is accepted; the CLI prints it on one line and exits with code 2."""


class CondiffError(Exception):
    """Base class of every error condiff raises on purpose."""


class ConfigError(CondiffError, ValueError):
    """A bad argument, option or recipe value."""


class InputFileError(CondiffError, OSError):
    """A missing, unreadable, truncated or unsafe input file."""


class OutputFileError(CondiffError, OSError):
    """An output path that cannot be written (a directory, under a regular file, read-only, ...)."""


class NonFiniteError(CondiffError, FloatingPointError):
    """A NaN or inf appeared during sampling or training."""


def one_of(kind: str, value, accepted) -> ConfigError:
    """Build the standard 'unknown X' error: names the value and lists what is accepted."""
    return ConfigError(f"unknown {kind} {value!r}; accepted: {', '.join(map(str, accepted))}")


def one_line(message: str) -> str:
    """``message`` with every line break or other control character escaped, so it prints as one line."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in str(message))
