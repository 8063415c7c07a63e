"""Writing the application's output files so that a failure names the file and never leaves half of one.

Every file a command writes (checkpoints, metrics, summaries, JSON and CSV results, plots, annotated
images, ONNX models) is first made in memory and then written with `write_atomically`: the bytes go to a
new hidden file beside the target (`.<name>.<pid>.<random>.tmp`, made with O_EXCL, so neither another writer's
temporary file nor a user's own `<name>.tmp` is ever overwritten), which replaces the target only once
complete. A failed write (full disk, read-only or missing
folder) removes the temporary file and raises `WriteError`, a one-line UserError naming the target.
`output_folder` makes a folder for --out and says in one line when the path is a file.
"""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from .errors import UserError

__all__ = ["WriteError", "output_folder", "temporary_name", "write_atomically", "write_text"]


class WriteError(UserError):
    """A file could not be written; the message names it. `errno` is the operating system's error number
    (errno.ENOSPC for a full disk)."""

    def __init__(self, message: str, errno_number: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_number


def _hint(error: OSError, flag: str) -> str:
    if error.errno == errno.ENOSPC:
        return f"free some space or choose another {flag}"
    return f"check that the folder exists and is writable, or choose another {flag}"


def write_atomically(path: str | os.PathLike, data: bytes | memoryview, what: str = "file",
                     flag: str = "--out") -> Path:
    """Write `data` to `path` through a temporary file of this writer's own and a rename; on failure remove
    the temporary file and raise WriteError naming `path` (`what` says what it is, `flag` which option chose
    it)."""
    path = Path(path)
    tmp = temporary_name(path)
    if path.is_dir():
        raise WriteError(f"cannot write {what} {str(path)!r}: it is a folder; choose another {flag}",
                         errno.EISDIR)
    made = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            made = True
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if made:  # never remove a file this call did not make
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        reason = exc.strerror or str(exc)
        raise WriteError(f"cannot write {what} {str(path)!r}: {reason}; {_hint(exc, flag)}", exc.errno) from exc
    return path


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_text(path: str | os.PathLike, text: str, what: str = "file", flag: str = "--out") -> Path:
    """`write_atomically` of UTF-8 text."""
    return write_atomically(path, text.encode("utf-8"), what, flag)


def output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """The folder `path`, made if missing; a UserError naming it when it is a file or cannot be made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a file, not a folder; choose a folder (it is made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {str(path)!r}: {exc.strerror or exc}; "
                        f"choose another {flag}") from exc
    return path
