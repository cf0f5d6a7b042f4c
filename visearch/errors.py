"""One small exception hierarchy. Library code raises these; only cli.py turns them into exit codes."""
from __future__ import annotations


class VisearchError(Exception):
    """Base class. `message` is one line naming the problem; `hint` says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(VisearchError):
    """Bad arguments: unknown model name, conflicting flags."""

    exit_code = 2


class DatasetError(VisearchError):
    """Missing or malformed dataset folder or ground truth."""


class StoreError(VisearchError):
    """Missing, corrupt or mismatched descriptor store."""


class ImageError(VisearchError):
    """An image that cannot be decoded or is unusable."""


class ModelError(VisearchError):
    """A model that cannot be built or run."""


class WeightsError(VisearchError):
    """Missing, corrupt or wrong-architecture weight file."""


class DetectorError(VisearchError):
    """A detector (local or cloud) failed."""


class DeviceError(VisearchError):
    """A device was requested that this machine does not have."""


class EngineError(VisearchError):
    """An extract engine that is not installed, cannot be reached or broke its contract (Ray)."""


class SearchIndexError(VisearchError):
    """A first-stage index that is missing, stale (the store changed under it) or cannot be built."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when it has none), at most `limit` characters:
    what goes inside our one-line error messages."""
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:limit]
