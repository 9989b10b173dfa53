"""A private swarm: every call must carry the swarm token, on the coordinator and on every peer."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from peft import PeftModel
from transformers import LlamaForCausalLM

from conftest import cli, connect
from finetune_oracle import write_color_task
from tsotsa.codec import encode
from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.errors import SwarmError
from tsotsa.local_swarm import LocalSwarm
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

TOKEN = "s3cret-swarm-token"
ADMIN = "s3cret-admin-token"
REFUSAL = "missing or wrong swarm token"


@pytest.fixture(scope="module")
def swarm(tiny_model: Path, tmp_path_factory):
    with LocalSwarm(tiny_model, cache_dir=tmp_path_factory.mktemp("cache"), token=TOKEN, admin_token=ADMIN) as swarm:
        swarm.start_coordinator()
        swarm.add_peers(["0:4"])
        yield swarm


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer wrong")], [("authorization", TOKEN)]])
def test_calls_without_the_token_are_refused(swarm, metadata) -> None:
    """Unary, server-streaming and bidirectional calls alike; a bare token without "Bearer" is wrong too."""
    with grpc.insecure_channel(swarm.coordinator_address) as channel:
        coordinator = pb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            coordinator.GetModelInfo(pb.ModelInfoRequest(), metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as fetch:
            list(coordinator.Fetch(pb.FetchRequest(model_id=swarm.model_id, tensor_prefixes=["model.norm."]),
                                   metadata=metadata, timeout=10))
        assert fetch.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(swarm.peers[0].address) as channel:
        peer = pb_grpc.PeerStub(channel)
        with pytest.raises(grpc.RpcError) as forward:
            peer.Forward(pb.ForwardRequest(model_id=swarm.model_id, start_block=0, end_block=4,
                                           hidden_states=encode(torch.zeros(1, 2, 64))), metadata=metadata, timeout=10)
        assert forward.value.code() == grpc.StatusCode.UNAUTHENTICATED
        opened = pb.InferenceRequest(session_id="s", open=pb.OpenSession(model_id=swarm.model_id, start_block=0,
                                                                          end_block=4, batch_size=1, max_length=4))
        with pytest.raises(grpc.RpcError) as inference:
            list(peer.Inference(iter([opened]), metadata=metadata, timeout=10))
        assert inference.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_clients_with_the_token_generate_as_transformers(swarm, tiny_model: Path, tmp_path_factory) -> None:
    with connect(swarm, tmp_path_factory, token=TOKEN) as model:
        ids = model.tokenizer("The swarm", return_tensors="pt").input_ids
        produced = model.generate(ids, max_new_tokens=8)
    expected = LlamaForCausalLM.from_pretrained(tiny_model).generate(ids, max_new_tokens=8, do_sample=False)
    assert produced.tolist() == expected.tolist()


def test_cli_without_the_token_is_one_readable_line(swarm, tmp_path: Path) -> None:
    argv = [*cli("tsotsa"), "status", "--coordinator", swarm.coordinator_address]
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={"TSOTSA_CACHE": str(tmp_path)})
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: coordinator at {swarm.coordinator_address}: UNAUTHENTICATED: "
                                      "missing or wrong swarm token")
    admitted = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env={"TSOTSA_CACHE": str(tmp_path), "TSOTSA_TOKEN": TOKEN})
    assert admitted.returncode == 0, admitted.stderr


# Every RPC of the wire protocol, from the descriptor itself: a new RPC is covered without touching this file.
SERVICES = pb.DESCRIPTOR.services_by_name
RPCS = [method for service in SERVICES.values() for method in service.methods]
# Metadata that must not get a call in: none, a wrong token, the right one without "Bearer", one character
# more, and the admin token alone (it is no swarm token).
WITHOUT_THE_TOKEN = [[], [("authorization", "Bearer wrong")], [("authorization", TOKEN)],
                     [("authorization", f"Bearer {TOKEN}x")], [("x-tsotsa-admin", ADMIN)]]


def address_of(swarm: LocalSwarm, service: str) -> str:
    return {"Coordinator": swarm.coordinator_address, "Peer": swarm.peers[0].address}[service]


def call(channel: grpc.Channel, method: MethodDescriptor, metadata) -> None:
    """One call of `method` with an empty request of its input type (a stream of one for a streaming input),
    the reply read to its end."""
    request_type, reply_type = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    stub = kinds[method.client_streaming, method.server_streaming](
        path, request_serializer=request_type.SerializeToString, response_deserializer=reply_type.FromString)
    request = iter([request_type()]) if method.client_streaming else request_type()
    reply = stub(request, metadata=metadata, timeout=10)
    if method.server_streaming:
        list(reply)


def test_the_protocol_has_the_rpcs_this_module_calls() -> None:
    """The enumeration below is not empty by accident, and every service has an address to call it at."""
    assert set(SERVICES) == {"Coordinator", "Peer"}
    assert len(RPCS) >= 20 and {"Forward", "Inference", "Fetch", "UploadData", "CreateRun", "WatchRun", "Step"} <= {
        method.name for method in RPCS}
    kinds = {(method.client_streaming, method.server_streaming) for method in RPCS}
    # unary, server-streaming, client-streaming (UploadData) and bidirectional
    assert {(False, False), (False, True), (True, False), (True, True)} <= kinds


@pytest.mark.parametrize("method", RPCS, ids=[f"{m.containing_service.name}.{m.name}" for m in RPCS])
def test_every_rpc_without_the_token_is_refused(swarm, method: MethodDescriptor) -> None:
    with grpc.insecure_channel(address_of(swarm, method.containing_service.name)) as channel:
        for metadata in WITHOUT_THE_TOKEN:
            with pytest.raises(grpc.RpcError) as refused:
                call(channel, method, metadata)
            assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, REFUSAL), \
                metadata
        # The control: with the token the same call gets past the check (the empty request may well be refused
        # for what it is), so the refusals above are the token's, not those of a server that refuses everything.
        try:
            call(channel, method, [("authorization", f"Bearer {TOKEN}")])
        except grpc.RpcError as error:
            assert error.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED), (
                error.code(), error.details())


def test_a_run_trains_and_its_adapter_is_served_with_the_token(swarm, tiny_model: Path, tmp_path: Path,
                                                               tmp_path_factory) -> None:
    """Fine-tuning in a private swarm: the coordinator drives the peers with the token, and a client that has
    it generates with the run's adapter as PEFT does."""
    data = write_color_task(tmp_path / "colors.jsonl")
    config = pb.RunConfig(rounds=1, steps_per_round=2, micro_batch=2, seq_len=64, lora_r=4, lora_alpha=8.0,
                          target_modules=["q_proj", "v_proj"], lr=1e-2, seed=3)
    with CoordinatorClient(swarm.coordinator_address, admin_token=ADMIN) as outsider:  # the admin token alone
        with pytest.raises(SwarmError, match="UNAUTHENTICATED"):
            outsider.create_run("private-run", config, data, data)
    with CoordinatorClient(swarm.coordinator_address, token=TOKEN, admin_token=ADMIN) as client:
        with pytest.raises(SwarmError, match="no run named"):
            client.run("private-run")  # the refused launch created nothing
        client.create_run("private-run", config, data, data)
        deadline = time.monotonic() + 300
        while (info := client.run("private-run")).state not in ("finished", "failed", "stopped"):
            assert time.monotonic() < deadline, f"still {info.state} ({info.message})"
            time.sleep(0.5)
    assert info.state == "finished", info.message
    assert [(r.round, r.state, r.samples) for r in info.rounds] == [(0, "done", 4)]
    assert not math.isnan(info.rounds[0].eval_loss)  # evaluated through the peer too

    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                     info.rounds[0].checkpoint)
    peft.eval()
    with connect(swarm, tmp_path_factory, token=TOKEN) as model:
        ids = model.tokenizer("the color of snow is", return_tensors="pt").input_ids
        deadline = time.monotonic() + 20  # the peer announces the adapter at once; the DHT catches up
        while True:
            try:
                produced = model.generate(ids, max_new_tokens=8, adapter="private-run")
                break
            except SwarmError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        adapted, plain = model.forward(ids, adapter="private-run"), model.forward(ids)
    with torch.no_grad():
        expected = peft.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        reference = peft(ids).logits
    assert produced.tolist() == expected.tolist()
    assert (adapted - reference).abs().max().item() <= 1e-4
    assert (adapted - plain).abs().max().item() > 1e-2  # the adapter served is the trained one, not a no-op
