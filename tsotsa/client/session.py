"""Inference through the swarm: one KV-cached stream per hop, and recovery when a peer fails.

The session remembers what it sent into every hop. When a hop's peer fails (dies, drains, runs out of
cache), the session bans it, plans a new route for that hop's blocks, opens streams there and replays the
remembered inputs to rebuild the KV caches; then the step goes on. The caller sees the same hidden
states, and generation the same tokens, as if nothing had happened.

With `verify_fraction`, hops are spot-checked after a step (`tsotsa.client.verify`). A peer caught
answering wrongly is banned and reported, and the session is rebuilt on other peers from the first step
it got wrong: `step` (or `verify_all`) then raises `Rewind`, which tells the caller to take up again from
that step with the correct output.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass, field

import grpc
import torch

from tsotsa.client import verify
from tsotsa.client.link import LinkUnavailable
from tsotsa.client.routing import Hop
from tsotsa.client.streams import STATUS_CODES, RequestStream, StreamFailure
from tsotsa.client.swarm import Swarm
from tsotsa.codec import WireError, decode, encode
from tsotsa.errors import SwarmError
from tsotsa.records import ServerRecord
from tsotsa.v1 import tsotsa_pb2 as pb

logger = logging.getLogger(__name__)

# Failures another peer may not have: retry elsewhere. Anything else is the caller's mistake. A peer that
# refuses this client's token or model (UNAUTHENTICATED, FAILED_PRECONDITION) is not what its record said:
# a peer of another swarm, or a record pointing where it should not; it is routed around like a dead one.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ABORTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION,
}
# A busy peer (no session slot or KV cache left) is fine, only full: this call goes elsewhere, and no ban
# keeps other calls from it.
BUSY = {grpc.StatusCode.RESOURCE_EXHAUSTED}


class Failures:
    """The failure rules of one call through the swarm (a generate's session, a forward): a retryable
    failure takes the peer out of this call's routes and, unless it was only busy, bans it for a while from
    the whole client's; anything else, or more than `config.max_failures` failures, ends the call with a
    SwarmError."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.banned: set[str] = set()
        self.count = 0
        self.last = ""

    def note(self, peer_id: str, code: grpc.StatusCode | None, message: str) -> None:
        if code not in RETRYABLE:
            raise SwarmError(message) from None
        self.count += 1
        self.last = " ".join(message.split())  # one line, whatever the peer's details held
        limit = self.swarm.config.max_failures
        if self.count > limit:
            raise SwarmError(f"giving up after {limit} peer failures; last: {message}") from None
        self.banned.add(peer_id)
        if code not in BUSY:
            self.swarm.ban(peer_id)

    def route(self, start: int, end: int, adapter: str = "") -> list[Hop]:
        """A route avoiding the peers that failed; after a failure, waits a little for one to appear, and
        says what the last failure was when none does."""
        if not self.count:
            return self.swarm.route(start, end, exclude=frozenset(self.banned), adapter=adapter)
        try:
            return self.swarm.route(start, end, exclude=frozenset(self.banned), adapter=adapter,
                                    wait=self.swarm.config.route_wait)
        except SwarmError as error:
            raise SwarmError(f"{error} (after {self.count} peer failures; last: {self.last})") from None


@dataclass
class StepInputs:
    hidden: torch.Tensor
    mask: torch.Tensor | None
    positions: torch.Tensor | None

    def to_message(self, wire_dtype: torch.dtype) -> pb.InferenceStep:
        step = pb.InferenceStep(hidden_states=encode(self.hidden, wire_dtype))
        if self.mask is not None:
            step.attention_mask.CopyFrom(encode(self.mask))
        if self.positions is not None:
            step.position_ids.CopyFrom(encode(self.positions))
        return step


class HopStream:
    """A bidirectional Inference stream to one peer, holding that peer's KV cache for blocks [start, end).
    With the swarm's link to that peer (`tsotsa.client.link`), its decode steps go through the link, merged
    with the client's other sessions' there; everything else goes on the stream."""

    def __init__(self, swarm: Swarm, hop: Hop, batch_size: int, max_length: int, adapter: str = "") -> None:
        self.hop = hop
        self.session_id = uuid.uuid4().hex
        self.link = swarm.link(hop.server.address)
        self._stepped = 0  # steps done: a linked step must follow the first
        self._stream = RequestStream(swarm.stub(hop.server.address).Inference, hop.server.address, swarm.watchdog,
                                     lambda: swarm.step_timeout, swarm.tls is not None)
        opened = pb.OpenSession(model_id=swarm.model_id, start_block=hop.start, end_block=hop.end,
                                batch_size=batch_size, max_length=max_length, adapter=adapter,
                                link_key=self.link.key if self.link is not None else b"")
        self._exchange(pb.InferenceRequest(session_id=self.session_id, open=opened))

    def step(self, inputs: StepInputs, wire_dtype: torch.dtype) -> torch.Tensor:
        message = inputs.to_message(wire_dtype)
        reply = self._linked(message) if self._stepped and inputs.hidden.shape[1] == 1 else None
        if reply is None:
            reply = self._exchange(pb.InferenceRequest(session_id=self.session_id, step=message))
        try:
            hidden = decode(reply.hidden_states, what="hidden_states", ndim=3)
        except WireError as error:
            raise HopFailure(self.hop, grpc.StatusCode.INTERNAL, f"malformed reply: {error}") from None
        if hidden.shape != inputs.hidden.shape:
            raise HopFailure(self.hop, grpc.StatusCode.INTERNAL,
                             f"reply of shape {list(hidden.shape)} for input {list(inputs.hidden.shape)}")
        self._stepped += 1
        return hidden

    def _linked(self, step: pb.InferenceStep) -> pb.LinkedResult | None:
        """The step through the link; None when there is none (or the peer takes none now)."""
        if self.link is None or not self.link.available:
            return None
        try:
            result = self.link.step(self.session_id, step)
        except LinkUnavailable:
            return None
        except StreamFailure as failure:
            raise HopFailure(self.hop, failure.code, f"link: {failure.details}") from None
        if result.code:
            raise HopFailure(self.hop, STATUS_CODES.get(result.code, grpc.StatusCode.UNKNOWN), result.details)
        return result

    def _exchange(self, request: pb.InferenceRequest) -> pb.InferenceResponse:
        try:
            return self._stream.exchange(request)
        except StreamFailure as failure:
            raise HopFailure(self.hop, failure.code, failure.details) from None

    def close(self) -> None:
        """Half-closes the stream: the peer finishes, frees the session and ends the call."""
        self._forget()
        self._stream.close()

    def abort(self) -> None:
        self._forget()
        self._stream.abort()

    def _forget(self) -> None:
        if self.link is not None:
            self.link.forget(self.session_id)


class HopFailure(Exception):
    def __init__(self, hop: Hop, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"peer {hop.server.peer_id[:12]} at {hop.server.address} (blocks {hop.start}:{hop.end}): "
                         f"{code.name}: {details}")
        self.hop, self.code = hop, code


@dataclass
class _Leg:
    stream: HopStream
    history: list[StepInputs] = field(default_factory=list)
    answers: list[torch.Tensor] = field(default_factory=list)  # what the peer returned for each step
    verified: int = 0  # steps [0, verified) checked against a replica

    def record(self, inputs: StepInputs, output: torch.Tensor) -> None:
        self.history.append(inputs)
        self.answers.append(output)


class Rewind(Exception):
    """The session's peers got step `step` (and maybe later ones) wrong; it was rebuilt on others, and
    `hidden` is the correct output of that step. The caller drops what it derived from steps >= `step`
    and goes on from `hidden`."""

    def __init__(self, step: int, hidden: torch.Tensor, liar: str) -> None:
        super().__init__(f"rewound to step {step}: {liar}")
        self.step, self.hidden = step, hidden


class InferenceSession:
    """One generation's KV-cached streams along a route covering every block; `step` runs new tokens'
    hidden states through all of them, replacing failed peers by replay (callers see no difference)."""

    def __init__(self, swarm: Swarm, batch_size: int, max_length: int, wire_dtype: torch.dtype = torch.float32,
                 adapter: str = "") -> None:
        """`adapter`: a run's name; every hop then applies that run's adapter (only peers that loaded it)."""
        self.swarm, self.batch_size, self.max_length, self.wire_dtype = swarm, batch_size, max_length, wire_dtype
        self.adapter = adapter
        self.failures = Failures(swarm)
        self.checks = 0  # spot checks made (each covers one hop's steps so far)
        self._random = random.Random()
        self.legs: list[_Leg] = self._open_legs(0, swarm.num_blocks, [])

    @property
    def route(self) -> list[Hop]:
        return [leg.stream.hop for leg in self.legs]

    def step(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Runs the new tokens' hidden states through all blocks; returns the last block's output."""
        index = 0
        while index < len(self.legs):
            inputs = StepInputs(hidden, mask, positions)
            leg = self.legs[index]
            try:
                output = leg.stream.step(inputs, self.wire_dtype)
            except HopFailure as failure:
                self._recover(index, failure)
                continue
            leg.record(inputs, output)
            hidden = output
            index += 1
        fraction = self.swarm.config.verify_fraction
        for leg in list(self.legs):
            if fraction and self._random.random() < fraction:
                self._check(leg, required=False)
        return hidden

    @property
    def verified_steps(self) -> int:
        """How many steps, from the first, every hop's answers were checked for."""
        return min(leg.verified for leg in self.legs)

    def verify_all(self) -> None:
        """Checks every hop's answers so far; Rewind if one was wrong, SwarmError if a hop has no replica."""
        for leg in list(self.legs):
            self._check(leg, required=True)

    def _check(self, leg: _Leg, required: bool) -> None:
        """Compares the hop's answers with a replica's; on a disagreement a third peer decides who lied
        (without one, both are suspect). The liar is banned and reported, and the session rebuilt."""
        steps = len(leg.history)
        if leg.verified == steps:
            return
        hop = leg.stream.hop
        layout = verify.prefix(leg.history)
        relative = verify.tolerance(hop.server)
        excluded = self.failures.banned | self.swarm.banned()

        def mismatch(output: torch.Tensor) -> int | None:
            return verify.first_mismatch(leg.answers, output, layout.lengths, layout.mask, relative)

        verdict = verify.judge(hop.server, lambda output: mismatch(output) is None,
                               lambda others: self._replica_output(hop, layout, excluded | others))
        if verdict is None:
            if required:
                raise SwarmError(f"cannot check blocks {hop.start}:{hop.end}: no other online peer serves them "
                                 f"in {hop.server.dtype}/{hop.server.quant}")
            return
        self.checks += 1
        if verdict.liars == [verdict.referee]:  # the hop and a third agree: the referee lied
            self._caught(verdict.referee, f"blocks {hop.start}:{hop.end}: {verdict.why}")
        if not verdict.liars or verdict.liars == [verdict.referee]:
            leg.verified = steps
            return
        bad_step = mismatch(verdict.truth)
        for liar in verdict.liars:
            self._caught(liar, f"blocks {hop.start}:{hop.end}: its answer to step {bad_step} differs from "
                               f"{verdict.why}")
        self._rebuild(bad_step, ", ".join(liar.peer_id[:12] for liar in verdict.liars))

    def _replica_output(self, hop: Hop, layout: "verify.Prefix", excluded: set[str]
                        ) -> tuple[ServerRecord, torch.Tensor] | None:
        """The first comparable replica's Forward over the hop's history, or None when none answers."""
        for replica in verify.replicas(self.swarm.servers(), hop.server, hop.start, hop.end, excluded):
            request = pb.ForwardRequest(model_id=self.swarm.model_id, start_block=hop.start, end_block=hop.end,
                                        hidden_states=encode(layout.hidden, self.wire_dtype),
                                        attention_mask=encode(layout.mask), position_ids=encode(layout.positions),
                                        adapter=self.adapter)
            try:
                reply = self.swarm.stub(replica.address).Forward(request, timeout=self.swarm.step_timeout)
                output = decode(reply.hidden_states, what="hidden_states", ndim=3)
            except (grpc.RpcError, WireError) as error:
                logger.info("replica %s could not check blocks %d:%d: %s", replica.address, hop.start, hop.end,
                            error)
                continue
            if output.shape == layout.hidden.shape:
                return replica, output
        return None

    def _caught(self, server: ServerRecord, reason: str) -> None:
        logger.warning("peer %s at %s answered wrongly: %s", server.peer_id, server.address, reason)
        self.failures.banned.add(server.peer_id)
        self.swarm.caught(server, reason)

    def _rebuild(self, step: int, liar: str) -> None:
        """Every hop reopened on peers not banned, fed the first hop's inputs up to `step`; Rewind with the
        correct output of `step`."""
        inputs = self.legs[0].history[:step + 1]
        for leg in self.legs:
            leg.stream.abort()
        self.legs = self._open_legs(0, self.swarm.num_blocks, inputs)
        raise Rewind(step, self.legs[-1].answers[-1], liar)

    def close(self) -> None:
        for leg in self.legs:
            leg.stream.close()

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _recover(self, index: int, failure: HopFailure) -> None:
        """Replaces leg `index` by a new route for its blocks and replays its history there."""
        self._note_failure(failure)
        failed = self.legs[index]
        failed.stream.abort()
        replacement = self._open_legs(failure.hop.start, failure.hop.end, failed.history)
        self.legs[index:index + 1] = replacement

    def _open_legs(self, start: int, end: int, history: list[StepInputs]) -> list[_Leg]:
        """Opens streams along a route for [start, end) and feeds them `history`, retrying other peers."""
        while True:
            route = self.failures.route(start, end, self.adapter)
            legs: list[_Leg] = []
            try:
                for hop in route:
                    legs.append(_Leg(HopStream(self.swarm, hop, self.batch_size, self.max_length, self.adapter)))
                for past in history:
                    hidden = past.hidden
                    for leg in legs:
                        inputs = StepInputs(hidden, past.mask, past.positions)
                        hidden = leg.stream.step(inputs, self.wire_dtype)
                        leg.record(inputs, hidden)
                return legs
            except HopFailure as failure:
                for leg in legs:
                    leg.stream.abort()
                self._note_failure(failure)

    def _note_failure(self, failure: HopFailure) -> None:
        """Bans the failed peer, or gives up when the failure is not the peer's or there were too many."""
        self.failures.note(failure.hop.server.peer_id, failure.code, str(failure))
