"""Progress lines for the pipeline's long steps: where a step is and when it will end.

>>> progress = Progress("evaluator", "generated", total=64, interval_s=0.0)
>>> progress.update(16, lambda: ", 3.2 stories/s")  # doctest: +ELLIPSIS
[evaluator] generated 16/64, 3.2 stories/s, about ... left
"""

import time

from components.common import format_duration

# How often a long step says where it is.
PROGRESS_SECONDS = 10.0


class Progress:
    """Prints `[step] noun done/total, details, about T left` at most every `interval_s` seconds
    (PROGRESS_SECONDS by default); the time left is from the pace since the Progress was made,
    and no later than `deadline` (a time.time() value). With no total: `[step] done noun, details`."""

    def __init__(self, step: str, noun: str, total: int | None = None, *, done: int = 0,
                 deadline: float | None = None, interval_s: float | None = None):
        self.step, self.noun, self.total, self.first, self.deadline = step, noun, total, done, deadline
        self.interval_s = PROGRESS_SECONDS if interval_s is None else interval_s
        self.start = self.last_print = time.time()

    def update(self, done: int, details=lambda: "") -> None:
        """`done` so far; `details()` (called only when a line is due) adds to the line."""
        now = time.time()
        if now - self.last_print < self.interval_s:
            return
        self.last_print = now
        if self.total is None:
            print(f"[{self.step}] {done:,} {self.noun}{details()}", flush=True)
            return
        left = (self.total - done) * (now - self.start) / max(done - self.first, 1)
        if self.deadline is not None:
            left = min(left, self.deadline - now)
        print(f"[{self.step}] {self.noun} {done}/{self.total}{details()}, about {format_duration(left)} left",
              flush=True)

    def elapsed(self) -> float:
        return time.time() - self.start
