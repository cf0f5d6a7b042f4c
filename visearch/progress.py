"""Progress bars on stderr (rich), with throughput and ETA; a no-op when quiet."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def task(description: str, total: int | None, quiet: bool = True, unit: str = "img") -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`. Shows `description [bar] done/total  N unit/s  ETA` on stderr unless quiet.

    `advance` also has `.set_total(n)` for work whose size is known only once it starts."""
    if quiet:
        def advance(n: int = 1) -> None:
            pass
        advance.set_total = lambda n: None
        yield advance
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class Rate(TextColumn):
        def render(self, t):  # noqa: D401 - rich column hook
            from rich.text import Text
            speed = t.finished_speed or t.speed
            return Text(f"{speed:.1f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               Rate(""), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        tid = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(tid, n)
        advance.set_total = lambda n: bar.update(tid, total=n)
        yield advance
