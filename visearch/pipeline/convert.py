"""Step `convert`: a folder of photos (or a revisitop folder) -> a dataset, with a progress bar (see visearch.data)."""
from __future__ import annotations

from pathlib import Path

from ..fsutil import refused_writes
from ..workspace import Workspace


def convert(source: str | Path, name: str, data_dir: str | Path | None = None,
            ground_truth: str | Path | None = None, replace: bool = False, quiet: bool = True, *,
            workspace: Workspace | None = None):
    """Folder of images (or a revisitop dataset folder) -> `<data_dir>/<name>` in revisitop layout.

    `replace` allows converting a different source folder into an existing dataset name. `workspace`, when given,
    supplies data_dir and quiet. Returns visearch.data.ConvertReport."""
    from .. import data, progress

    ws = workspace or Workspace.resolve(data_dir, quiet=quiet)
    with refused_writes(f"the data dir {ws.data_dir}"), progress.task(f"convert {name}", None, ws.quiet) as advance:
        return data.convert(source, ws.data_dir, name, ground_truth=ground_truth, progress=advance,
                            on_total=advance.set_total, replace=replace)
