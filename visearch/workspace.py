"""Where a run reads and writes, and on what: data dir, weights dir, device, quietness. One object passed down the
library instead of four loose arguments in different orders."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .config import default_data_dir, default_weights_dir


@dataclass(frozen=True)
class Workspace:
    """`data_dir` holds datasets and stores, `weights_dir` weight files; `device` is "auto", "cpu" or "cuda[:N]";
    `quiet` silences progress bars. Build one with `Workspace.resolve(...)`, which fills in the defaults
    ($VISEARCH_DATA_DIR or ./data, $VISEARCH_WEIGHTS_DIR or ./weights)."""

    data_dir: Path
    weights_dir: Path
    device: str = "auto"
    quiet: bool = True

    @classmethod
    def resolve(cls, data_dir: str | Path | None = None, weights_dir: str | Path | None = None,
                device: str | None = "auto", quiet: bool = True) -> Workspace:
        d = Path(data_dir) if data_dir is not None else default_data_dir()
        if d.exists() and not d.is_dir():
            from .errors import DatasetError

            raise DatasetError(f"data dir {d} is not a folder", "pass --data-dir FOLDER (or set VISEARCH_DATA_DIR)")
        return cls(d, Path(weights_dir) if weights_dir is not None else default_weights_dir(), device or "auto", quiet)

    def with_(self, **changes) -> Workspace:
        """A copy with some fields changed (e.g. `ws.with_(device="cpu")`)."""
        return replace(self, **changes)
