"""TVM's errors (its own types, many lines of C++ context) as the one line a user reads."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """The line of a TVM or Python error that says what went wrong (not TVM's metadata or traceback lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().startswith("#")]
    if not lines:
        return type(exc).__name__
    if type(exc).__module__ == "builtins" and not isinstance(exc, (ValueError, RuntimeError, TypeError)):
        return f"{type(exc).__name__}: {lines[-1]}"  # KeyError('num_heads') alone says nothing
    return lines[-1]
