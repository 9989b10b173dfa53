"""Learning-rate schedules against transformers' own schedulers (the Trainer's), step by step."""

from __future__ import annotations

import pytest
import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from tsotsa.training.schedule import check_schedule, learning_rate

ORACLES = {"constant": lambda opt, warmup, total: get_constant_schedule_with_warmup(opt, warmup),
           "linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}


@pytest.mark.parametrize("schedule", list(ORACLES))
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_each_step_has_transformers_learning_rate(schedule: str, warmup: int):
    total, base = 10, 2e-3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = ORACLES[schedule](optimizer, warmup, total)
    for step in range(total):
        assert learning_rate(step, base, schedule, warmup, total) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                                                  rel=1e-12, abs=1e-15)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("schedule, warmup, message", [("step", 0, "unknown learning-rate schedule"),
                                                       ("cosine", 11, "warm-up steps must be in 0..10"),
                                                       ("linear", -1, "warm-up steps must be in 0..10")])
def test_bad_schedules_are_refused(schedule: str, warmup: int, message: str):
    with pytest.raises(ValueError, match=message):
        check_schedule(schedule, warmup, 10)
