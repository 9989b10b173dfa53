"""For tests that drive a peer's training RPCs themselves: a channel that signs them as the swarm's
coordinator would (with its key, read from the coordinator's state directory), since peers accept training
calls only with the coordinator's run credential (`tsotsa.peer.roles`)."""

from __future__ import annotations

import grpc

from tsotsa.auth import CallDetails
from tsotsa.local_swarm import LocalSwarm
from tsotsa.rpc import open_channel
from tsotsa.run_credentials import METADATA_KEY, RunSigner


class SignRuns(grpc.UnaryUnaryClientInterceptor):
    """Adds a credential for the request's `run` to every call whose request has one."""

    def __init__(self, signer: RunSigner, model_id: str) -> None:
        self.signer, self.model_id = signer, model_id

    def intercept_unary_unary(self, continuation, details, request):
        run = getattr(request, "run", None)
        if run is None:
            return continuation(details, request)
        metadata = [*(details.metadata or ()), (METADATA_KEY, self.signer.credential(self.model_id, run))]
        return continuation(CallDetails(details, metadata), request)


def coordinator_signer(swarm: LocalSwarm) -> RunSigner:
    return RunSigner(swarm.state_dir / "run-signing.key")


def coordinator_channel(swarm: LocalSwarm, address: str) -> grpc.Channel:
    """A channel to `address` whose training calls carry the coordinator's credentials."""
    channel = open_channel(address, swarm.token, swarm.tls)
    return grpc.intercept_channel(channel, SignRuns(coordinator_signer(swarm), swarm.model_id))
