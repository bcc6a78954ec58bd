"""The training layer's error type: bad configs, bad data lines, checkpoints that cannot be resumed, and file
system failures (an unwritable directory, a full disk) told in one line instead of a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator

from minimind.errors import MiniMindError


class TrainingError(MiniMindError):
    """A training input or state the user can fix; the message names the file/line or field and the fix."""


@contextlib.contextmanager
def os_errors(action: str, setting: str) -> Iterator[None]:
    """Turn a failed read or write inside the block into a TrainingError: `action` says what was being done,
    the OS says why, and `setting` (e.g. "--output-dir") is what the user changes to fix it.

    torch.save and safetensors report a full disk as RuntimeError / SafetensorError; the OS error behind
    them (their __context__, or "(os error 28)" in the text) is what is reported.
    """
    try:
        yield
    except MiniMindError:
        raise
    except OSError as err:
        raise TrainingError(describe(action, err, setting)) from None
    except Exception as err:
        cause = os_cause(err)
        if cause is None:
            raise
        raise TrainingError(describe(action, cause, setting)) from None


def os_cause(err: BaseException) -> OSError | None:
    """The OSError behind an exception: itself, one in its cause/context chain, or "(os error N)" in its text."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


def describe(action: str, err: OSError, setting: str) -> str:
    reason = err.strerror or str(err)
    if err.filename:
        reason += f" ({err.filename})"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space on that disk or set {setting} to a directory on another disk"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make it writable or set {setting} to a writable directory"
    else:
        fix = f"check {setting}"
    return f"{action}: {reason}; {fix}"
