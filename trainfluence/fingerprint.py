"""Content fingerprints: the one owner of hashing.  Store keys, dataset and checkpoint identities, cached s_test
entries and file checksums are all :func:`fingerprint` (SHA-256) of their parts.

A part may be bytes, text, a number, a dataclass / dict / list (hashed as its canonical JSON), a numpy array or
a torch tensor (hashed with its dtype and shape, then its bytes).  No torch import here.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .settings import canonical_json


def _update(h: "hashlib._Hash", part: Any) -> None:
    if isinstance(part, (bytes, bytearray, memoryview)):
        h.update(part)
    elif isinstance(part, str):
        h.update(part.encode())
    elif hasattr(part, "detach") and hasattr(part, "dtype"):  # a torch tensor
        t = part.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if str(t.dtype) != "torch.bfloat16" else t.float().numpy().tobytes())
    elif hasattr(part, "tobytes") and hasattr(part, "dtype"):  # a numpy array
        h.update(f"{part.dtype}{tuple(part.shape)}".encode())
        h.update(memoryview(part.__array__()).cast("B") if part.flags.c_contiguous else part.tobytes())
    else:
        h.update(canonical_json(part).encode())
    h.update(b"\x00")


def fingerprint(*parts: Any, length: int | None = 16) -> str:
    """SHA-256 hex digest of ``parts`` in order (truncated to ``length`` hex digits; None keeps all 64)."""
    h = hashlib.sha256()
    for part in parts:
        _update(h, part)
    return h.hexdigest()[:length] if length else h.hexdigest()


class RowsFingerprint:
    """:func:`fingerprint` of numpy arrays given a block of rows at a time, so an array larger than memory can be
    hashed as it is written or read: ``begin(dtype, shape)``, ``rows(block)`` … in order, ``end()`` per array,
    then ``hexdigest()`` — the same digest as ``fingerprint(*arrays, length=None)`` of the whole arrays."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def begin(self, dtype: Any, shape: tuple[int, ...]) -> None:
        self._h.update(f"{dtype}{tuple(int(d) for d in shape)}".encode())

    def rows(self, block: Any) -> None:
        self._h.update(memoryview(block).cast("B") if block.flags.c_contiguous else block.tobytes())

    def end(self) -> None:
        self._h.update(b"\x00")

    def array(self, a: Any) -> None:
        """A whole (small) array: ``begin``, its rows, ``end``."""
        _update(self._h, a)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def file_sha256(path: Any, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in chunks (memory bounded)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
