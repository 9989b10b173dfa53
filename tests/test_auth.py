"""A private swarm: every call must carry the swarm token, on the coordinator and on every peer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import cli, connect
from tsotsa.codec import encode
from tsotsa.local_swarm import LocalSwarm
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

TOKEN = "s3cret-swarm-token"


@pytest.fixture(scope="module")
def swarm(tiny_model: Path, tmp_path_factory):
    with LocalSwarm(tiny_model, cache_dir=tmp_path_factory.mktemp("cache"), token=TOKEN) as swarm:
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
