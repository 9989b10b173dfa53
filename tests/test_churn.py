"""Churn under load: peers join and leave on a schedule — one SIGKILL, one SIGTERM, one new peer, at least
one replica of every span at all times — while 64 greedy requests run through the HTTP API, four at a
time. No request fails, and every output equals `transformers`' greedy text for its prompt."""

from __future__ import annotations

import threading

import openai
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from tsotsa.local_swarm import LocalSwarm

PROMPTS = ["The swarm pools", "Once upon a time", "Every machine hosts", "A client embeds the prompt",
           "Fine-tuning runs", "Numbers from zero", "When a peer leaves", "Students and small labs"]
REQUESTS, AT_ONCE, NEW_TOKENS = 64, 4, 24


def test_requests_survive_peers_joining_and_leaving(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    reference = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    expected = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            output = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=NEW_TOKENS)
        expected[prompt] = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)

    with LocalSwarm(tiny_model, cache_dir=tmp_path / "cache", http=True) as swarm:
        swarm.start_coordinator()
        swarm.add_peers(["0:2", "0:2", "2:4", "2:4"])
        client = openai.OpenAI(base_url=f"{swarm.http_url}/v1", api_key="none", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        results: list[tuple[str, str]] = []
        failures: list[str] = []
        finished = threading.Condition()
        stop = threading.Event()

        def stream(first: int) -> None:  # requests one after another until the schedule is over
            index = first
            while not stop.is_set():
                prompt = PROMPTS[index % len(PROMPTS)]
                index += AT_ONCE
                try:
                    text = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS,
                                                      temperature=0).choices[0].text
                    outcome = (prompt, text)
                except openai.OpenAIError as error:
                    outcome = None
                    failures.append(f"{prompt!r}: {error}")
                with finished:
                    if outcome is not None:
                        results.append(outcome)
                    finished.notify_all()

        def after(more: int) -> None:
            """Waits (bounded) until `more` further requests ended: the schedule follows the load, not a clock."""
            with finished:
                target = len(results) + len(failures) + more
                assert finished.wait_for(lambda: len(results) + len(failures) >= target, timeout=300), \
                    "requests stopped finishing"

        streams = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(AT_ONCE)]
        for thread in streams:
            thread.start()
        try:
            after(8)
            swarm.kill_peer(next(p for p in swarm.peers if (p.start, p.end) == (0, 2)))  # SIGKILL: no drain
            after(8)
            swarm.add_peers(["0:2"])  # a new peer joins the span the killed one left
            after(8)
            swarm.stop_peer(next(p for p in swarm.peers if (p.start, p.end) == (2, 4)))  # SIGTERM: it drains
            after(max(8, REQUESTS - len(results) - len(failures)))
        finally:
            stop.set()
            for thread in streams:
                thread.join(300)
    assert not failures, failures
    assert len(results) >= REQUESTS
    wrong = [(prompt, text) for prompt, text in results if text != expected[prompt]]
    assert not wrong, wrong
