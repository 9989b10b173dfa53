"""The learning rate of each optimizer step: linear warm-up, then constant, linear or cosine decay.

Step k of a run has one learning rate whichever pipeline takes it, because steps are numbered by the data
they consume (unit k of the run), not by the peer that runs them. The shapes are transformers'
(`get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup`), so a run is comparable with a
Trainer run on one machine.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def check_schedule(schedule: str, warmup_steps: int, total_steps: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule[:40]!r}; expected one of {', '.join(SCHEDULES)}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warm-up steps must be in 0..{total_steps} (the run's steps), not {warmup_steps}")


def learning_rate(step: int, base: float, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return base * step / max(1, warmup_steps)
    if schedule == "constant":
        return base
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
