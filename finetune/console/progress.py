"""Progress bars (tqdm, on a terminal only) and the one-line metric summaries of the log."""

from __future__ import annotations

import contextlib
import sys


class _NoBar:
    enabled = False

    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=True, dynamic_ncols=True)
    bar.enabled = True
    return bar


def log_above_progress_bars(enabled: bool):
    """While progress bars draw, log lines go through tqdm.write so the two never interleave."""
    if not (enabled and sys.stderr.isatty()):
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def format_metrics(values: dict[str, float]) -> str:
    """`val loss 0.4123  val acc 0.9312` from {"val/loss": ..., "val/acc": ...}."""
    return "  ".join(f"{name.replace('/', ' ')} {value:.4f}" for name, value in values.items())
