"""Rich progress bars and tables, shared by every command."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


def console(stderr: bool = False):
    from rich.console import Console

    # soft wrap: a long line (a path, a resume command) stays one line that can be copied whole
    return Console(stderr=stderr, soft_wrap=True)


@contextmanager
def progress_bar(label: str, con=None, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """Yields advance(n). Shows count, rate and ETA; silent when output is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    con = con or Console()
    # not a terminal (a log file, CI): no bar at all, not even the blank line a transient bar leaves
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=con, transient=True, disable=not con.is_terminal) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n: prog.advance(task, n)


class _TrainBar:
    def __init__(self, prog, task):
        self.prog, self.task = prog, task

    def update(self, step: int, **metrics) -> None:
        if self.prog is not None:
            self.prog.update(self.task, completed=step, **metrics)


@contextmanager
def train_progress(total: int, start: int, enabled: bool = True, console=None):
    """Steps done, loss, lr, tokens/s and ETA; only on the main process."""
    if not enabled:
        yield _TrainBar(None, None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tokens_per_s]:.0f} tok/s"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as prog:
        task = prog.add_task("train", total=total, completed=start, loss=float("nan"), lr=0.0, tokens_per_s=0.0)
        yield _TrainBar(prog, task)
