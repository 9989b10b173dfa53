"""Exact aggregation of replicas' adapters.

Every replica of a block shares the frozen A (drawn from the run's seed), so the sample-weighted mean of
the replicas' ΔW = B_i·A is (Σ w_i B_i / Σ w_i)·A: averaging B alone is exact. A replica whose A differs
would break that identity, so it is refused rather than averaged.
"""

from __future__ import annotations

import torch

from tsotsa.errors import TsotsaError
from tsotsa.training.lora import parse_adapter_key


class AggregationError(TsotsaError):
    pass


def aggregate(previous: dict[str, torch.Tensor], replicas: list[tuple[dict[str, torch.Tensor], int]]
              ) -> dict[str, torch.Tensor]:
    """The new adapter: for each B some replica trained (weight = its samples), the weighted mean of the
    replicas' B; every other tensor as in `previous`."""
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, int] = {}
    for state, samples in replicas:
        if samples <= 0:
            continue
        for key, tensor in state.items():
            if key not in previous:
                raise AggregationError(f"a replica holds {key}, which the run's adapter does not have")
            if key.endswith(".lora_A.weight"):
                if not torch.equal(tensor.float(), previous[key].float()):
                    raise AggregationError(f"a replica's {key} differs from the run's frozen A")
                continue
            sums[key] = sums.get(key, 0) + tensor.double() * samples
            weights[key] = weights.get(key, 0) + samples
    result = dict(previous)
    for key, total in sums.items():
        result[key] = (total / weights[key]).to(previous[key].dtype)
    return result


def adapter_problem(previous: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """Why a replica's adapter cannot be averaged in (a tensor the run does not have, of another shape, or
    not finite), or None."""
    for key, tensor in state.items():
        expected = previous.get(key)
        if expected is None:
            return f"it holds {key[:120]}, which the run's adapter does not have"
        if tensor.shape != expected.shape:
            return f"its {key} has shape {list(tensor.shape)}, not {list(expected.shape)}"
        if not torch.isfinite(tensor).all():
            return f"its {key} is not finite"
    return None


def blocks_of(state: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    """The tensors of blocks [start, end): what one peer holds."""
    return {key: tensor for key, tensor in state.items() if start <= parse_adapter_key(key)[0] < end}
