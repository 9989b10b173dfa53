"""Roles: a peer takes training calls only from the coordinator (its signed run credential), never from a
caller that has only the swarm token, and such a call changes nothing (`tsotsa.peer.roles`)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from coordinator_role import coordinator_channel, coordinator_signer
from tsotsa.codec import decode, encode
from tsotsa.local_swarm import LocalSwarm
from tsotsa.rpc import open_channel
from tsotsa.run_credentials import METADATA_KEY, RunSigner
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

TOKEN = "roles-test-token"
TIMEOUT = 60
HIDDEN = 64
SPEC = pb.LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=7, lr=1e-2,
                   weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8)
SERVED = "served-run"


@pytest.fixture(scope="module")
def swarm(tiny_model: Path, tmp_path_factory):
    with LocalSwarm(tiny_model, cache_dir=tmp_path_factory.mktemp("cache"), token=TOKEN) as swarm:
        swarm.start_coordinator()
        swarm.add_peers(["0:4"])
        yield swarm


@pytest.fixture(scope="module")
def member(swarm) -> pb_grpc.PeerStub:
    """A caller with the swarm token and nothing else."""
    channel = open_channel(swarm.peers[0].address, TOKEN)
    yield pb_grpc.PeerStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def coordinator(swarm) -> pb_grpc.PeerStub:
    channel = coordinator_channel(swarm, swarm.peers[0].address)
    yield pb_grpc.PeerStub(channel)
    channel.close()


def x() -> torch.Tensor:
    return torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(3))


def served_output(stub: pb_grpc.PeerStub, model_id: str) -> torch.Tensor:
    reply = stub.Forward(pb.ForwardRequest(model_id=model_id, start_block=0, end_block=4, hidden_states=encode(x()),
                                           adapter=SERVED), timeout=TIMEOUT)
    return decode(reply.hidden_states)


@pytest.fixture(scope="module")
def served(swarm, coordinator) -> torch.Tensor:
    """A run's adapter, trained-looking (B not zero), served by the peer; what Forward gives with it."""
    coordinator.OpenTraining(pb.OpenTrainingRequest(model_id=swarm.model_id, run=SERVED, lora=SPEC), timeout=TIMEOUT)
    reply = coordinator.GetAdapter(pb.GetAdapterRequest(run=SERVED), timeout=TIMEOUT)
    tensors = []
    for item in reply.tensors:
        tensor = decode(item.tensor)
        if item.name.endswith("lora_B.weight"):
            tensor = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(tensors))) * 0.1
        tensors.append(pb.NamedTensor(name=item.name, tensor=encode(tensor)))
    coordinator.SetAdapter(pb.SetAdapterRequest(run=SERVED, tensors=tensors), timeout=TIMEOUT)
    coordinator.CloseTraining(pb.CloseTrainingRequest(run=SERVED, keep=True), timeout=TIMEOUT)
    return served_output(coordinator, swarm.model_id)


def training_calls(model_id: str, run: str, zeros: list[pb.NamedTensor]) -> dict[str, object]:
    return {
        "OpenTraining": pb.OpenTrainingRequest(model_id=model_id, run=run, lora=SPEC),
        "SetAdapter": pb.SetAdapterRequest(run=run, tensors=zeros),
        "GetAdapter": pb.GetAdapterRequest(run=run),
        "TrainForward": pb.TrainForwardRequest(run=run, micro_batch="m", hidden_states=encode(x())),
        "TrainBackward": pb.TrainBackwardRequest(run=run, micro_batch="m", grad_output=encode(x())),
        "Step": pb.StepRequest(run=run, samples=1),
        "Discard": pb.DiscardRequest(run=run),
        "CloseTraining": pb.CloseTrainingRequest(run=run),
    }


def zeroed(coordinator: pb_grpc.PeerStub, model_id: str) -> list[pb.NamedTensor]:
    """The served adapter's tensor names and shapes, all zeros: what a vandal would push."""
    probe = "probe-run"
    coordinator.OpenTraining(pb.OpenTrainingRequest(model_id=model_id, run=probe, lora=SPEC), timeout=TIMEOUT)
    reply = coordinator.GetAdapter(pb.GetAdapterRequest(run=probe), timeout=TIMEOUT)
    coordinator.CloseTraining(pb.CloseTrainingRequest(run=probe), timeout=TIMEOUT)
    return [pb.NamedTensor(name=item.name, tensor=encode(torch.zeros_like(decode(item.tensor))))
            for item in reply.tensors]


@pytest.mark.parametrize("run", [SERVED, "a-new-run"])
def test_a_member_with_only_the_token_cannot_train_or_replace_an_adapter(swarm, member, coordinator, served,
                                                                          run) -> None:
    for method, request in training_calls(swarm.model_id, run, zeroed(coordinator, swarm.model_id)).items():
        with pytest.raises(grpc.RpcError) as refused:
            getattr(member, method)(request, timeout=TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
        assert "only from the coordinator" in refused.value.details(), method
    assert torch.equal(served_output(member, swarm.model_id), served)  # the served adapter is untouched
    with pytest.raises(grpc.RpcError) as absent:  # and no run was opened
        coordinator.GetAdapter(pb.GetAdapterRequest(run="a-new-run"), timeout=TIMEOUT)
    assert absent.value.code() == grpc.StatusCode.NOT_FOUND


def credential_call(member: pb_grpc.PeerStub, credential: bytes, run: str, model_id: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        member.OpenTraining(pb.OpenTrainingRequest(model_id=model_id, run=run, lora=SPEC), timeout=TIMEOUT,
                            metadata=[(METADATA_KEY, credential)])
    return refused.value


def test_forged_borrowed_and_expired_credentials_are_refused(swarm, member, tmp_path: Path) -> None:
    signer = coordinator_signer(swarm)
    cases = {
        "not signed by this swarm's coordinator": RunSigner(tmp_path / "other.key").credential(swarm.model_id, "r1"),
        "for run 'r2'": signer.credential(swarm.model_id, "r2"),
        "expired": signer.credential(swarm.model_id, "r1", lifetime=-3600),
        "not signed by this swarm's": b"\x0a\x03abc\x12\x02zz",
    }
    for expected, credential in cases.items():
        error = credential_call(member, credential, "r1", swarm.model_id)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and expected in error.details(), error.details()


def test_the_coordinators_credential_opens_a_run(swarm, member) -> None:
    credential = coordinator_signer(swarm).credential(swarm.model_id, "allowed")
    state = member.OpenTraining(pb.OpenTrainingRequest(model_id=swarm.model_id, run="allowed", lora=SPEC),
                                timeout=TIMEOUT, metadata=[(METADATA_KEY, credential)])
    assert state.trainable_parameters > 0
    member.CloseTraining(pb.CloseTrainingRequest(run="allowed"), timeout=TIMEOUT,
                         metadata=[(METADATA_KEY, credential)])
