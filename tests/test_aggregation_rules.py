"""What the coordinator refuses to average into a round's adapter (`tsotsa.training.aggregate`)."""

from __future__ import annotations

import math

import torch

from tsotsa.training.aggregate import adapter_problem, aggregate

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def previous() -> dict[str, torch.Tensor]:
    return {KEY_A: torch.ones(2, 8), KEY_B: torch.zeros(8, 2)}


def test_a_well_formed_replica_passes() -> None:
    assert adapter_problem(previous(), {KEY_A: torch.ones(2, 8), KEY_B: torch.randn(8, 2)}) is None


def test_wrong_shapes_foreign_keys_and_non_finite_values_are_refused() -> None:
    assert "shape" in adapter_problem(previous(), {KEY_B: torch.zeros(8, 3)})
    assert "does not have" in adapter_problem(previous(), {KEY_B.replace("q_proj", "k_proj"): torch.zeros(8, 2)})
    for bad in (math.nan, math.inf, -math.inf):
        poisoned = torch.zeros(8, 2)
        poisoned[3, 1] = bad
        assert "not finite" in adapter_problem(previous(), {KEY_B: poisoned})


def test_weights_are_the_samples_given() -> None:
    """aggregate() weighs by the counts it is given: the coordinator passes its own (RunDriver._gather)."""
    one, two = torch.full((8, 2), 1.0), torch.full((8, 2), 4.0)
    result = aggregate(previous(), [({KEY_B: one}, 3), ({KEY_B: two}, 1)])
    assert torch.allclose(result[KEY_B], torch.full((8, 2), (3 * 1.0 + 1 * 4.0) / 4))
