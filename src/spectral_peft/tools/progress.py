"""Progress a user can read anywhere: a tqdm bar on a terminal; when stderr is a file or a pipe (a log, a compare
cell, ``2> run.log``), a line every N steps or T seconds with the count, the rate and the time left, and at the end.

The training loop, every evaluation pass and S2FT's preparation report through :class:`Progress`; ``configure``
sets, once per run, how often a log gets a line (``--log-every``) and whether anything is shown (``--quiet``).
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Optional

from spectral_peft_cli.arguments import DEFAULT_LOG_EVERY, log_every

_SETTINGS = {"every": log_every(DEFAULT_LOG_EVERY), "quiet": False, "terminal": None}


def configure(every: str = DEFAULT_LOG_EVERY, quiet: bool = False, terminal: Optional[bool] = None) -> None:
    """``every``: ``"20"`` (steps) or ``"30s"``; ``terminal`` None: whether stderr is a terminal."""
    _SETTINGS.update(every=log_every(every), quiet=quiet, terminal=terminal)


def _terminal() -> bool:
    if _SETTINGS["terminal"] is not None:
        return _SETTINGS["terminal"]
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _plural(unit: str) -> str:
    if unit == "matrix":
        return "matrices"
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


class Progress:
    """``total`` units of work named ``desc`` (``initial`` already done, as in a resumed run). ``leave``: a long
    pass (training) whose log gets a line after its first unit, to show it started and its speed; a short one
    (an evaluation pass, S2FT's preparation) gets lines only once it has run for an interval."""

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, leave: bool = True):
        self.total, self.desc, self.unit, self.count = total, desc, unit, initial
        self.started, self.initial, self.announce = time.perf_counter(), initial, leave
        self.last_line, self.last_count, self.lines = self.started, initial, 0
        self.postfix: dict = {}
        self.bar = None
        if not _SETTINGS["quiet"] and _terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, n: int = 1, **postfix) -> None:
        self.count += n
        self.postfix = postfix
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif not _SETTINGS["quiet"] and self._line_due():
            self._line()

    def _line_due(self) -> bool:
        kind, every = _SETTINGS["every"]
        if self.count >= self.total:  # the last, where the log has the others
            return self.announce or self.lines > 0
        if self.announce and self.lines == 0:
            return True
        if kind == "steps":
            return self.count // every > self.last_count // every
        return time.perf_counter() - self.last_line >= every

    def _line(self) -> None:
        now = time.perf_counter()
        elapsed = now - self.started
        done = self.count - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.unit} {self.count}/{self.total}"]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        if rate >= 0.1:
            parts.append(f"{rate:.2f} {_plural(self.unit)}/s")
        elif rate > 0:
            parts.append(f"{1 / rate:.1f} s/{self.unit}")
        if self.count < self.total and rate > 0:
            parts.append(f"{duration((self.total - self.count) / rate)} left")
        elif self.count >= self.total:
            parts.append(f"{duration(elapsed)} in all")
        print(", ".join(parts), file=sys.stderr, flush=True)
        self.last_line, self.last_count, self.lines = now, self.count, self.lines + 1

    def write(self, message: str) -> None:
        """A line of the log, clear of the bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable, total: Optional[int] = None, desc: str = "", unit: str = "it", leave: bool = False,
          disable: Optional[bool] = None, **_):
    """tqdm's call for an iterable, through :class:`Progress` (``disable=True``: no progress at all)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable is True or total is None:
        yield from iterable
        return
    with Progress(total, desc, unit=unit, leave=leave) as progress:
        for item in iterable:
            yield item
            progress.update(1)
