"""Errors a user can cause, and their translation into the CLI's one-line messages.

The library raises the exception types below (or the standard ones: ``ValueError``,
``FileNotFoundError``, ``OSError``, ...) with messages that name the file or config key and the fix.
:func:`explain` turns any exception a user can cause into ``(one line, exit code)``; the CLI's
``main()`` prints that line instead of a traceback (``--debug`` or ``DCDIT_DEBUG=1`` shows it too).
Exceptions that :func:`explain` does not recognise are bugs: they keep their traceback.

Exit codes: 2 for bad input (config, arguments, files), 1 for the environment (disk full, permission
denied, out of memory), 130 when interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import sys
import traceback
import warnings

DEBUG_ENV = "DCDIT_DEBUG"

#: errnos that mean the disk (or the user's quota) is full.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: How libraries word it when they hide the errno: safetensors prints the Rust io::Error ("No space left
#: on device (os error 28)", measured on a full tmpfs); torch.save keeps the OSError as __context__.
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


class DcditError(Exception):
    """Base of dcdit's own errors: the message is one line naming the file or key and the fix."""

    exit_code = 2


class ConfigError(DcditError, ValueError):
    """A config value out of its range or inconsistent with another (see :mod:`dcdit.config_checks`)."""


class CheckpointError(DcditError, ValueError):
    """A checkpoint (or a file passed as one) that cannot be used: corrupt, truncated, the wrong kind."""


class UnsafePickleError(CheckpointError):
    """A pickle that ``torch.load(weights_only=True)`` refuses: it holds Python objects beyond tensors."""


class UnreadableImageError(DcditError, ValueError):
    """An image ``extract-features --strict`` cannot decode."""


class DiskFullError(DcditError, OSError):
    """Writing failed because the disk (or quota) is full; ``filename`` is the folder written to."""

    exit_code = 1

    def __init__(self, message: str, folder: str | os.PathLike):
        super().__init__(errno.ENOSPC, message, str(folder))
        self.message = message

    def __str__(self) -> str:
        return self.message


class DcditWarning(UserWarning):
    """A problem dcdit worked around (e.g. a corrupt checkpoint skipped); printed as one line by the CLI."""


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` or an exception it was raised from / during is a full disk or quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def unpickling_refusal(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, in a few words (its own message is a page long)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if "Weights only load failed" in text:
        held = f" ({found.group(1)})" if found else ""
        return (f"it holds Python objects other than tensors{held}, which torch.load(weights_only=True) blocks "
                "because unpickling them could run code")
    return f"it is not a valid pickle ({_first_line(text)})"


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` anywhere on the command line, or ``DCDIT_DEBUG`` set to 1 / true / yes."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(text) -> str:
    """``text`` (an exception, a message) on one line: runs of whitespace and newlines become one space."""
    return " ".join(str(text).split())


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _yaml_message(exc) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(p for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
    problem = problem or _first_line(exc)
    if mark is None:
        return f"malformed YAML: {one_line(problem)}"
    if mark.name.startswith("<"):  # an override's value (parse_override reads it as YAML)
        text = (mark.buffer or "").rstrip("\0")
        return f"malformed YAML in the override value {text!r} (column {mark.column + 1}): {problem}; quote or fix the value"
    return f"malformed YAML in {mark.name}, line {mark.line + 1}, column {mark.column + 1}: {problem}; fix the file"


def _os_message(exc: OSError, out: str | None) -> tuple[str, int]:
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        target = exc.filename or out or "the output folder"
        return (f"permission denied for {target} ({exc.strerror}): fix its permissions, or write to a folder you "
                "can write to (--out)"), 1
    if isinstance(exc, FileNotFoundError):
        return (f"no such file or folder: {exc.filename}; check the path" if exc.filename else one_line(exc)), 2
    if exc.filename:
        return f"{exc.strerror or _first_line(exc)}: {exc.filename}", 1
    return one_line(exc), 1


def explain(exc: BaseException, out: str | None = None) -> tuple[str, int] | None:
    """``(one-line message, exit code)`` for a failure a user can cause; None for anything else (a bug).

    ``out``: the command's output folder, named when a write fails without saying where."""
    import yaml

    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, DcditError):
        return one_line(exc), exc.exit_code
    if isinstance(exc, yaml.YAMLError):
        return _yaml_message(exc), 2
    if isinstance(exc, pickle.UnpicklingError):
        return f"refused to load a pickle: {unpickling_refusal(exc)}; pass a .safetensors file or a plain state-dict .pt", 2
    if type(exc).__name__ == "SafetensorError":
        return (f"unreadable .safetensors file ({one_line(exc)}): it is truncated or corrupt; use another copy or "
                "checkpoint"), 2
    if is_disk_full(exc):
        where = getattr(exc, "filename", None) or out
        return (f"the disk is full{f' while writing {where}' if where else ''}: free some space or write elsewhere "
                "(--out), then run again"), 1
    if isinstance(exc, OSError):
        return _os_message(exc, out)
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"the package {exc.name!r} is not installed: pip install {exc.name.split('.')[0]}", 2
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return (f"out of memory ({_first_line(exc) or type(exc).__name__}): lower train.micro_batch_size when "
                "training, --batch-size / --per-class when sampling"), 1
    if isinstance(exc, ValueError):
        return one_line(exc), 2
    return None


def run_command(func, args, command: str, debug: bool = False) -> int:
    """``func(args)``; a failure a user can cause becomes one line on stderr and an exit code.
    With ``debug`` the traceback is printed first; unrecognised exceptions (bugs) are re-raised."""
    try:
        with one_line_warnings():
            return func(args)
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt too; everything else is re-raised
        explained = None if isinstance(exc, SystemExit) else explain(exc, out=getattr(args, "out", None))
        if explained is None:
            raise
        if debug:
            traceback.print_exc()
        message, code = explained
        print(f"dcdit {command}: error: {message}", file=sys.stderr)
        return code


@contextlib.contextmanager
def one_line_warnings():
    """Within the block, every :class:`DcditWarning` is printed as ``dcdit: warning: ...`` on stderr
    (other warnings keep Python's format and filters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", DcditWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DcditWarning):
                print(f"dcdit: warning: {one_line(message)}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
