"""Spot checks of peers' work: a hop's answers recomputed by another peer that serves the same blocks.

A check replays the hop's whole history (every input it was sent, the prompt and each decode step) as one
stateless `Forward` on a replica and compares the replica's output at every position with what the hop
answered, step by step. So one check covers every step of that hop so far, KV-cached decode steps
included, at the cost of one prefill of the sequence so far on the replica (no shadow session: the
replica holds nothing between checks). The tolerance follows from the dtype both peers compute in; peers
of another dtype or quantization are not asked (their honest answers differ by more than a lie needs to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tsotsa.records import ServerRecord
from tsotsa.spans import position_ids_from_mask

# Largest |answer - replica| allowed, relative to the replica's largest |value| at that step. fp32 peers
# agree to ~1e-6 on one machine (prefill and decode sum in different orders) and ~1e-4 across CPU and GPU;
# 16-bit ones to a few 1e-3.
RELATIVE_TOLERANCE = {"float32": 2e-3, "bfloat16": 5e-2, "float16": 2e-2}


def tolerance(server: ServerRecord) -> float:
    return RELATIVE_TOLERANCE.get(server.dtype, 5e-2)


def comparable(checked: ServerRecord, replica: ServerRecord) -> bool:
    """Whether `replica` computes what `checked` does closely enough to judge it."""
    return (replica.peer_id != checked.peer_id and (replica.dtype, replica.quant) == (checked.dtype, checked.quant))


def replicas(servers: list[ServerRecord], checked: ServerRecord, start: int, end: int,
             exclude: frozenset[str] | set[str]) -> list[ServerRecord]:
    """Online peers that serve all of [start, end) like `checked` does, fastest first."""
    found = [s for s in servers if s.serving and s.start <= start and end <= s.end and s.peer_id not in exclude
             and comparable(checked, s)]
    return sorted(found, key=lambda s: -s.throughput)


@dataclass
class Prefix:
    """A hop's history as one Forward request's tensors, and where each step's tokens sit in it."""

    hidden: torch.Tensor     # [batch, tokens, hidden]
    mask: torch.Tensor       # [batch, tokens]
    positions: torch.Tensor  # [batch, tokens]
    lengths: list[int]       # tokens per step


def prefix(history: list) -> Prefix:
    """`history`: the hop's `StepInputs`, in order. Masks and positions are filled in as the peer does for
    a step that gives none (ones; positions that continue the mask)."""
    masks, positions = [], []
    seen = None
    for step in history:
        batch, length = step.hidden.shape[:2]
        mask = step.mask if step.mask is not None else torch.ones(batch, length, dtype=torch.long)
        seen = mask if seen is None else torch.cat([seen, mask], dim=1)
        masks.append(mask)
        positions.append(step.positions if step.positions is not None
                         else position_ids_from_mask(seen)[:, -length:])
    return Prefix(torch.cat([step.hidden for step in history], dim=1), torch.cat(masks, dim=1),
                  torch.cat(positions, dim=1), [step.hidden.shape[1] for step in history])


def first_mismatch(answers: list[torch.Tensor], replica: torch.Tensor, lengths: list[int], mask: torch.Tensor,
                   relative: float) -> int | None:
    """The first step whose answer differs from the replica's output (at positions the mask keeps) by more
    than `relative` times the replica's largest |value| there; None when all agree. `lengths`: tokens per
    step, laid end to end in `replica` and `mask`."""
    offset = 0
    for step, (answer, length) in enumerate(zip(answers, lengths)):
        expected = replica[:, offset:offset + length].float()
        keep = mask[:, offset:offset + length].bool()
        offset += length
        if not keep.any():
            continue
        difference = (answer.float() - expected).abs()[keep]
        scale = expected.abs()[keep].max().clamp_min(1e-6)
        if not torch.isfinite(difference).all() or difference.max() > relative * scale:
            return step
    return None


# What a referee gives for the checked peer's input: (the referee, its output), or None when none answered.
Ask = Callable[[frozenset[str]], "tuple[ServerRecord, torch.Tensor] | None"]


@dataclass
class Verdict:
    referee: ServerRecord
    truth: torch.Tensor          # the first referee's output
    liars: list[ServerRecord]    # empty: the checked answer stands
    why: str = ""


def judge(checked: ServerRecord, agrees: Callable[[torch.Tensor], bool], ask: Ask) -> Verdict | None:
    """Whether `checked`'s answer stands, asking referees through `ask` (which leaves out the peers it is
    given): a disagreement is decided by a third peer (the one that disagrees with both others lied);
    without one both are suspect. None when no referee answered."""
    first = ask(frozenset())
    if first is None:
        return None
    referee, truth = first
    if agrees(truth):
        return Verdict(referee, truth, [])
    third = ask(frozenset({referee.peer_id}))
    if third is not None and agrees(third[1]):
        return Verdict(referee, truth, [referee], "its recomputation disagreed with two other peers")
    if third is not None:
        return Verdict(referee, truth, [checked], "two other peers")
    return Verdict(referee, truth, [checked, referee], "a replica, and no third peer could decide")
