"""Progress in the text log, for runs whose tqdm bar is off (batch jobs that log to files).

A cluster job's log otherwise says nothing between start-up and the first evaluation: the first step's time
(compilation, data workers, warm-up) and then, every ``train.progress_log_s`` seconds, where the run is, its loss, its
speed and the time left at that speed.
"""
from __future__ import annotations

import logging
import math
import time

log = logging.getLogger("mardini.train")


def finite_mean(values: list[float]) -> float:
    """Mean of the finite values (0 if none): a skipped non-finite step does not poison a logged window."""
    finite = [x for x in values if math.isfinite(x)]
    return sum(finite) / max(len(finite), 1)


def format_duration(seconds: float) -> str:
    """3725.4 -> '1 h 2 min', 75 -> '1 min 15 s', 4.2 -> '4 s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


class ProgressLog:
    """Log the launch's first step once; with ``lines`` on, one progress line at most every ``every_s`` seconds.

    The speed counts the steps since the last line, from the end of the first step on: start-up never inflates the
    time left. Evaluations and checkpoints fall inside the windows, so the time left includes their share.
    """

    def __init__(self, *, start_step: int, max_steps: int, samples_per_step: int, every_s: float, lines: bool,
                 clock=time.perf_counter):
        self.start_step, self.max_steps, self.samples_per_step = start_step, max_steps, samples_per_step
        self.every_s, self.lines, self.clock = every_s, lines and every_s > 0, clock
        self.launch_start = clock()
        self.mark, self.mark_step, self.losses = self.launch_start, start_step, []

    def update(self, step: int, loss: float) -> None:
        now = self.clock()
        if step == self.start_step + 1:
            log.info("step %d: the launch's first step took %.1f s (compilation, data workers and warm-up included)",
                     step, now - self.launch_start)
            self.mark, self.mark_step = now, step
            return
        if not self.lines:
            return
        self.losses.append(loss)
        if now - self.mark < self.every_s and step < self.max_steps:
            return
        steps_per_s = (step - self.mark_step) / max(now - self.mark, 1e-9)
        left = (self.max_steps - step) / max(steps_per_s, 1e-9)
        log.info("step %d/%d (%d %%): loss %.4f, %.2f steps/s (%.1f clips/s), about %s left", step, self.max_steps,
                 100 * step // self.max_steps, finite_mean(self.losses), steps_per_s,
                 steps_per_s * self.samples_per_step, format_duration(left))
        self.mark, self.mark_step, self.losses = now, step, []
