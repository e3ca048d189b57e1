"""Every file the engine writes goes through here: written under a temporary name that carries the process id
and renamed into place only when complete (a killed or failing process leaves no partial file under the real
name, and the temporary is removed), JSON written that way, arrays and blobs with a SHA-256 checksum beside them
that is verified when they are read back, space reserved up front for memory-mapped arrays (a full disk fails
at once, not with SIGBUS halfway through), and one clear error when the disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserError
from .fingerprint import file_sha256
from .settings import to_dict

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_counter = iter(range(1 << 62))
_lock = threading.Lock()


def temporary_name(path: Path) -> Path:
    """A sibling name unique to this process and call: ``.NAME.PID.N.tmp``."""
    with _lock:
        n = next(_counter)
    return path.with_name(f".{path.name}.{os.getpid()}.{n}.tmp")


def disk_full(exc: OSError, path: Path | str) -> UserError:
    return UserError(f"no space left to write {path} ({os.strerror(exc.errno or errno.ENOSPC)}): free some space "
                     "or write elsewhere (--out, --cache-dir)")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is renamed to ``path``, on any failure
    (including KeyboardInterrupt) removed.  A full disk becomes a :class:`UserError`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in DISK_FULL:
            raise disk_full(exc, path) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with writing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically; NaN and Inf are refused (they are not JSON and never belong in a report)."""
    text = json.dumps(to_dict(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return write_text(path, text)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def npy_writer(array: Any) -> Callable[[Path], None]:
    """For :func:`save_with` / :func:`save_verified`: write ``array`` as ``.npy`` to the temporary path."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return write


def save_with(path: str | os.PathLike, save: Callable[[Path], Any]) -> Path:
    """Atomically write ``path`` by calling ``save(temporary_path)`` (e.g. ``torch.save``, ``fig.savefig``).
    Libraries that report a failed write as ``RuntimeError`` (torch, faiss) get the same one-line error."""
    with writing(path) as tmp:
        try:
            save(tmp)
        except RuntimeError as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            raise UserError(f"could not write {path} ({reason}): is the disk full? free some space or write "
                            "elsewhere (--out, --cache-dir)") from exc
    return Path(path)


# ---- checksummed artefacts --------------------------------------------------------------------------------------
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_verified(path: str | os.PathLike, save: Callable[[Path], Any]) -> Path:
    """Write ``path`` atomically and its SHA-256 beside it (``NAME.sha256``), data first, checksum last."""
    path = Path(path)
    _sidecar(path).unlink(missing_ok=True)
    save_with(path, save)
    write_text(_sidecar(path), file_sha256(path) + "\n")
    return path


def verified(path: str | os.PathLike) -> bool:
    """True when ``path`` exists and its bytes match the checksum written with it."""
    path = Path(path)
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        return side.read_text().strip() == file_sha256(path)
    except OSError:
        return False


def discard(path: str | os.PathLike) -> None:
    """Remove a checksummed artefact and its checksum."""
    path = Path(path)
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)


def reserve(path: Path, nbytes: int) -> None:
    """Allocate ``nbytes`` for ``path`` now, so writing its rows later cannot hit a full disk."""
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise disk_full(exc, path) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
