"""The coordinator's spot checks of the peers that train: a TrainForward answer recomputed on a replica.

A peer's answer to a micro-batch depends on its adapter as it is at that moment (it has stepped on its own
data since the round began), so the check takes that adapter from the peer (`GetAdapter`), loads it on
another peer of the same span as a throw-away run, and compares that peer's `Forward` of the same input
with the answer, with the tolerance of `tsotsa.client.verify`. A disagreement is decided by a third peer
of the span when there is one (the one that disagrees with both lied); without one both are suspect.
LoRA dropout would make honest answers differ, so runs with spot checks have none.
"""

from __future__ import annotations

import logging
import random

import grpc
import torch

from tsotsa.client import verify
from tsotsa.client.swarm import Swarm
from tsotsa.codec import WireError
from tsotsa.records import ServerRecord
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.coordinator.pipeline_client import PipelineBroken, PipelineClient

logger = logging.getLogger(__name__)

Trace = list[tuple[ServerRecord, torch.Tensor, torch.Tensor]]  # (peer, its input as sent, its answer)


class LiarCaught(Exception):
    def __init__(self, liars: list[ServerRecord], reason: str) -> None:
        super().__init__(reason)
        self.liars, self.reason = liars, reason


class SpotChecks:
    """Checks each peer of a traced TrainForward with chance `fraction`."""

    def __init__(self, client: PipelineClient, swarm: Swarm, lora: pb.LoraSpec, fraction: float) -> None:
        self.client, self.swarm, self.lora, self.fraction = client, swarm, lora, fraction
        self._random = random.Random()

    def check(self, trace: Trace, mask: torch.Tensor, excluded: set[str]) -> None:
        """LiarCaught when a checked answer is wrong; PipelineBroken when the checked peer does not answer."""
        for peer, sent, answer in trace:
            if self._random.random() < self.fraction:
                self._check(peer, sent, answer, mask, excluded)

    def _check(self, peer: ServerRecord, sent: torch.Tensor, answer: torch.Tensor, mask: torch.Tensor,
               excluded: set[str]) -> None:
        # the referee loads the peer's adapter, which holds exactly the peer's blocks: the same span only
        referees = [s for s in verify.replicas(self.swarm.servers(), peer, peer.start, peer.end, excluded)
                    if (s.start, s.end) == (peer.start, peer.end)]
        if not referees:
            return
        try:
            adapter = self.client.adapter_of(peer)
        except (grpc.RpcError, WireError) as error:
            raise PipelineBroken(peer, f"GetAdapter for a spot check: {error}") from None
        relative = verify.tolerance(peer)
        verdict = verify.judge(
            peer, lambda output: verify.first_mismatch([answer], output, [answer.shape[1]], mask, relative) is None,
            lambda others: self._recompute([r for r in referees if r.peer_id not in others], adapter, sent, mask))
        if verdict is None or not verdict.liars:
            return
        where = f"blocks {peer.start}:{peer.end}"
        if verdict.liars == [peer]:
            raise LiarCaught(verdict.liars, f"peer {peer.peer_id}'s TrainForward over {where} differs from "
                                            f"{verdict.why}")
        names = " and ".join(f"peer {liar.peer_id}" for liar in verdict.liars)
        raise LiarCaught(verdict.liars, f"{names} over {where}: {verdict.why}")

    def _recompute(self, referees: list[ServerRecord], adapter: dict[str, torch.Tensor], sent: torch.Tensor,
                   mask: torch.Tensor) -> tuple[ServerRecord, torch.Tensor] | None:
        for referee in referees:
            try:
                output = self.client.recompute(referee, adapter, self.lora, sent, mask)
            except (grpc.RpcError, WireError) as error:
                logger.info("referee %s could not recompute: %s", referee.address, error)
                continue
            if output.shape == sent.shape:
                return referee, output
        return None
