"""Peer-side batching across independent clients: eight client processes (tests/gated_client.py, each its
own `SwarmModel`), started a moment apart with different prompts and lengths, through one swarm. Each output
equals `transformers` greedy, and the peers' own metrics show passes that computed two or more sessions'
decode steps together."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import LlamaForCausalLM

from conftest import start_swarm
from tsotsa.metrics_server import METRICS_READY

PROMPTS = ["The swarm pools ordinary lab machines", "Once upon", "Every machine hosts a span of transformer blocks",
           "A client embeds", "Fine-tuning runs in rounds: each peer", "Numbers from zero to nine:",
           "When a peer leaves, the client finds another route", "Students"]
NEW_TOKENS = [120, 64, 96, 128, 72, 104, 80, 112]
STAGGER = 0.04  # seconds between two clients' starts, once all are ready
CLIENT = [sys.executable, str(Path(__file__).with_name("gated_client.py"))]


def batch_histogram(url: str) -> tuple[float, float]:
    """(passes computed, passes that held one session only) from a peer's `tsotsa:peer_batch_sessions`."""
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "tsotsa:peer_batch_sessions")
    count = next(s.value for s in family.samples if s.name.endswith("_count"))
    alone = next(s.value for s in family.samples if s.name.endswith("_bucket") and float(s.labels["le"]) == 1.0)
    return count, alone


def test_eight_client_processes_are_batched_and_each_equals_transformers(tiny_model, tmp_path):
    swarm = start_swarm(tiny_model, ["0:2", "2:4"], "--metrics-port", "0", cache_dir=tmp_path / "cache")
    clients = []
    try:
        urls = ["http://{1}:{2}/metrics".format(*peer.process.wait_for(METRICS_READY, timeout=5).groups())
                for peer in swarm.peers]
        gate = tmp_path / "go"
        for index, (prompt, new_tokens) in enumerate(zip(PROMPTS, NEW_TOKENS)):
            clients.append(subprocess.Popen(
                [*CLIENT, swarm.coordinator_address, str(gate), str(index * STAGGER), str(new_tokens),
                 str(tmp_path / f"client-{index}"), prompt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for client in clients:  # every client joined the swarm; then they start, STAGGER apart
            assert client.stdout.readline().strip() == "ready", client.stderr.read()
        gate.touch()
        results = []
        for client in clients:
            out, err = client.communicate(timeout=300)
            assert client.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        reference = LlamaForCausalLM.from_pretrained(tiny_model).eval()
        for result, new_tokens in zip(results, NEW_TOKENS):
            prompt = torch.tensor([result["prompt_ids"]])
            with torch.no_grad():
                expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                              max_new_tokens=new_tokens)
            assert result["output_ids"] == expected[0, prompt.shape[1]:].tolist()
        histograms = [batch_histogram(url) for url in urls]
        print(f"passes and passes with one session, per peer: {histograms}")
        assert all(count > 0 for count, _ in histograms), histograms
        assert sum(count - alone for count, alone in histograms) > 0, f"no pass held two sessions: {histograms}"
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
        swarm.stop()
