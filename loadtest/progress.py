"""Live progress on the terminal: one bar per level with its ok/failed counts."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from fitserve.loadtest.client import RequestResult
from fitserve.loadtest.sweep import LevelSpec


class LiveProgress:
    """Feeds a rich `Progress` from the sweep's callbacks. Use as a context manager around the run."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description:>10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ok {task.fields[ok]}  failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task: TaskID | None = None
        self._ok = 0
        self._failed = 0

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start_level(self, spec: LevelSpec) -> None:
        """A new bar for the level about to run."""
        self._ok = self._failed = 0
        self._task = self._progress.add_task(spec.label, total=spec.num_requests, ok=0, failed=0)

    def request_done(self, result: RequestResult) -> None:
        """Advance the current bar."""
        if self._task is None:
            return
        if result.ok:
            self._ok += 1
        else:
            self._failed += 1
        self._progress.update(self._task, advance=1, ok=self._ok, failed=self._failed)
