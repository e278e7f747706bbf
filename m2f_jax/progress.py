"""A one-line text progress bar on stderr, shared by the command line, evaluation and training."""
from __future__ import annotations

import sys
import time
from typing import Optional


def _bar(done: int, total: int) -> str:
    filled = int(24 * done / max(total, 1))
    return f"[{'#' * filled}{'.' * (24 - filled)}] {done}/{total}"


def write_progress(done: int, total: int, suffix: str = "") -> None:
    """A one-line text progress bar on stderr, rewritten in place; ends the line when done."""
    sys.stderr.write(f"\r{_bar(done, total)}{suffix}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


class Progress:
    """``write_progress`` with a rate: ``update(n)`` after each item; silent unless ``enabled``
    (by default: stderr is a terminal)."""

    def __init__(self, total: int, unit: str = "images", enabled: Optional[bool] = None):
        self.total, self.unit, self.done = total, unit, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.perf_counter()

    def _line(self) -> str:
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        return f"{_bar(self.done, self.total)} {rate:.2f} {self.unit}/s"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            sys.stderr.write("\r" + self._line() + ("\n" if self.done >= self.total else ""))
            sys.stderr.flush()

    def print(self, text: str, file=None) -> None:
        """Prints a line (stdout by default) above the bar: the bar is erased, then redrawn."""
        file = sys.stdout if file is None else file
        if not self.enabled or self.done >= self.total:
            print(text, file=file, flush=True)
            return
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
        print(text, file=file, flush=True)
        if self.done:
            sys.stderr.write(self._line())
            sys.stderr.flush()
