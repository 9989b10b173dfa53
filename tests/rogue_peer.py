"""A peer that misbehaves on purpose, for tests only (no product flag makes a peer do this): the real
`tsotsa-peer`, with one behaviour replaced before it starts.

    python tests/rogue_peer.py MODE join --coordinator ... (the arguments of `tsotsa-peer`)

Modes:
- refuse-token: announces its span like any admitted peer, then answers every inference call
  UNAUTHENTICATED, as a peer configured with another token for its gRPC calls would.
- perturb: announces 10x its measured throughput (so routes prefer it) and, once a session holds more
  than LIE_AFTER tokens, adds noise to its answer on one decode step in LIE_EVERY (20%); its KV cache,
  its prefill and its Forward answers stay honest, as a careful liar's would.
- perturb-training: answers every TrainForward with noise added (its backward, its Forward, which referees
  use, and everything else stay honest).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import grpc

ROGUE = [sys.executable, __file__]


def refuse_token() -> None:
    from tsotsa.peer.service import PeerService

    def refuse(self, request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong swarm token")

    def refuse_stream(self, requests, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong swarm token")
        yield  # a generator, as the real method is

    PeerService.Forward = refuse
    PeerService.Inference = refuse_stream
    PeerService.Link = refuse_stream


LIE_AFTER = 12  # tokens in the session before the first lie
LIE_EVERY = 5   # one decode step in this many is answered wrongly


def perturb() -> None:
    import torch

    from tsotsa.codec import decode, encode
    from tsotsa.peer import server
    from tsotsa.peer.service import PeerService

    from tsotsa.peer.throughput import ServedThroughput

    measure = server.measure_throughput
    server.measure_throughput = lambda span, *args, **kwargs: 10 * measure(span, *args, **kwargs)
    ServedThroughput.observe = lambda self, blocks, seconds: None  # the claim stands: served work would lower it
    honest_answer = PeerService._answer  # every session step's answer, on its stream or its client's link

    def lying_answer(self, session, work, output):
        answer = honest_answer(self, session, work, output)
        decoding = work.hidden.shape[1] == 1
        if decoding and session.length > LIE_AFTER and session.length % LIE_EVERY == 0:
            hidden = decode(answer)
            noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(session.length))
            answer = encode(hidden + 0.5 * hidden.abs().max() * noise, hidden.dtype)
        return answer

    PeerService._answer = lying_answer


def perturb_training() -> None:
    import torch

    from tsotsa.codec import decode, encode
    from tsotsa.peer.training_rpcs import TrainingService

    honest_forward = TrainingService.TrainForward

    def lying_forward(self, request, context):
        reply = honest_forward(self, request, context)
        hidden = decode(reply.hidden_states)
        noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(len(request.micro_batch)))
        reply.hidden_states.CopyFrom(encode(hidden + 0.5 * hidden.abs().max() * noise, hidden.dtype))
        return reply

    TrainingService.TrainForward = lying_forward


MODES: dict[str, Callable[[], None]] = {"refuse-token": refuse_token, "perturb": perturb,
                                        "perturb-training": perturb_training}


def command(mode: str) -> list[str]:
    """The `command` of `LocalSwarm.add_peers` that starts a rogue peer in `mode`."""
    assert mode in MODES, mode
    return [*ROGUE, mode]


if __name__ == "__main__":
    MODES[sys.argv.pop(1)]()
    from tsotsa.peer.cli import app

    app(prog_name="tsotsa-peer")
