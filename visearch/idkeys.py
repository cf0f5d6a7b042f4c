"""Stable 63-bit keys of image ids (and fingerprints): the first 8 bytes of blake2b, top bit cleared.

One helper for every user: the store writes each id's key into its shard (so an id -> row table is built from the
file, without hashing N ids again) and the FAISS index labels its vectors with the same keys.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

_MASK = np.uint64(2**63 - 1)


def keys_for(ids: Iterable[str | bytes] | np.ndarray) -> np.ndarray:
    """int64 `[n]` key per id: str (hashed as utf-8) or bytes (a numpy 'S' array: its utf-8 bytes)."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "S":
        items = ids.tolist()  # bytes, padding stripped
    else:
        items = [x.encode() if isinstance(x, str) else bytes(x) for x in ids]
    if not items:
        return np.empty(0, np.int64)
    digests = b"".join([hashlib.blake2b(x, digest_size=8).digest() for x in items])
    return (np.frombuffer(digests, "<u8") & _MASK).astype(np.int64)
