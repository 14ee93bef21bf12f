"""Rich progress bars and tables, shared by every command."""

from __future__ import annotations

import time
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


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainProgress:
    """What the run shows while it trains: a bar in a terminal; elsewhere (a log file, nohup, a
    scheduler's output) one plain, flushed line per logging step and per eval, since a bar writes
    nothing there."""

    def __init__(self, total: int, start: int, console=None, prog=None):
        self.total, self.start, self.console, self.prog = total, start, console, prog
        self.task = None if prog is None else prog.add_task("train", total=total, completed=start, stats="")
        self.t0, self.eval_loss, self.fields = time.time(), None, ""

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.fields = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
        if self.prog is not None:
            self._show(completed=step)
        elif self.console is not None:
            done = max(step - self.start, 1)
            eta = (time.time() - self.t0) / done * (self.total - step)
            self.console.print(f"step {step}/{self.total}  {self.fields}  eta {_clock(eta)}", highlight=False)

    def eval_started(self) -> None:
        if self.prog is not None:
            self.prog.update(self.task, description="eval")

    def eval_done(self, step: int, loss: float, perplexity: float) -> None:
        self.eval_loss = loss
        if self.prog is not None:
            self._show(description="train")
        elif self.console is not None:
            self.console.print(f"eval at step {step}: loss {loss:.4f}  perplexity {perplexity:.4g}", highlight=False)

    def _show(self, **what) -> None:
        ev = "" if self.eval_loss is None else f"  eval {self.eval_loss:.4f}"
        self.prog.update(self.task, stats=self.fields + ev, **what)


@contextmanager
def train_progress(total: int, start: int, enabled: bool = True, console=None) -> Iterator[TrainProgress]:
    """Steps done, loss, lr, tokens/s, the last eval loss and ETA; only on the main process."""
    if not enabled:
        yield TrainProgress(total, start)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = console or Console(soft_wrap=True)
    if not console.is_terminal:
        yield TrainProgress(total, start, console)
        return
    # no loss before the first step is logged: the bar starts with steps alone, not "loss nan"
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as prog:
        yield TrainProgress(total, start, console, prog)


@contextmanager
def eval_status(console=None, label: str = "final eval") -> Iterator[None]:
    """A spinner naming the eval while it runs, in a terminal; nothing elsewhere."""
    if console is None or not console.is_terminal:
        yield
        return
    with console.status(label):
        yield
