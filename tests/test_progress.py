"""The progress bar in a terminal (a log file's progress lines: tests/process/test_outputs.py)."""

from __future__ import annotations

import io


def test_terminal_bar_shows_eval(tmp_path):
    """In a terminal the bar starts with no loss (it showed `loss nan` before step 1), names the
    eval while it runs, and keeps the last eval loss beside the train loss."""
    from rich.console import Console

    from sftkit.progress import train_progress

    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=160, soft_wrap=True)
    with train_progress(4, 0, console=con) as bar:
        bar.prog.refresh()
        first = buf.getvalue()
        bar.update(1, loss=2.5, lr=1e-3, tokens_per_s=100)
        bar.eval_started()
        bar.prog.refresh()
        during = buf.getvalue()[len(first):]
        bar.eval_done(1, 2.25, 9.49)
        bar.update(2, loss=2.0, lr=1e-3, tokens_per_s=100)
        bar.prog.refresh()
        after = buf.getvalue()[len(first) + len(during):]
    assert "train" in first and "loss" not in first and "nan" not in first
    assert "eval" in during and "loss 2.5000" in during
    assert "loss 2.0000" in after and "eval 2.2500" in after
