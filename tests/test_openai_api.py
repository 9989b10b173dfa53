"""The HTTP API judged by the official `openai` client against a live swarm, and by `transformers`.

One swarm for the module: a coordinator serving the HTTP API (`--http-port 0`), two peers, a swarm token
(the API key) and a small fine-tuning run, so `/v1/models` has an adapter to list. The checkpoint carries
Llama-2-chat's template, so chat requests take the template path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer, LlamaForCausalLM

from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.local_swarm import HTTP_READY, LocalSwarm, ManagedProcess
from tsotsa.tiny_model import make_tiny_model
from tsotsa.rpc import open_channel
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

from conftest import cli, finish
from finetune_oracle import write_color_task

TOKEN, ADMIN = "api-swarm-token", "api-admin"
RUN = "api-run"
PROMPTS = ["The swarm pools", "Fine-tuning runs in", "Numbers from zero", "Once upon a time"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("chat") / "model", layers=4, hidden=64, heads=4, vocab=512,
                           seed=5, chat_template="llama-2")


@pytest.fixture(scope="module")
def swarm(chat_model, tmp_path_factory) -> Iterator[LocalSwarm]:
    swarm = LocalSwarm(chat_model, cache_dir=tmp_path_factory.mktemp("cache"), token=TOKEN, admin_token=ADMIN,
                       http=True)
    try:
        swarm.start_coordinator()
        swarm.add_peers(["0:2", "2:4"])
        data = write_color_task(tmp_path_factory.mktemp("data") / "colors.jsonl")
        with CoordinatorClient(swarm.coordinator_address, token=TOKEN, admin_token=ADMIN) as client:
            client.create_run(RUN, pb.RunConfig(rounds=1, steps_per_round=1, micro_batch=2, seq_len=32, lora_r=4,
                                                lora_alpha=8, target_modules=["q_proj", "v_proj"], lr=1e-2), data,
                              None)
            finish(client, RUN)
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def api(swarm) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{swarm.http_url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base(api) -> str:
    return api.models.list().data[0].id


@pytest.fixture(scope="module")
def hf(chat_model):
    return LlamaForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(chat_model):
    return AutoTokenizer.from_pretrained(chat_model)


def greedy(hf, ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        output = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False)
    return output[0, len(ids):].tolist()


def test_models_lists_the_base_and_the_trained_adapter(api, swarm):
    names = [model.id for model in api.models.list().data]
    assert names[0] == swarm.model_id
    assert f"{swarm.model_id}:{RUN}" in names


def test_greedy_completion_equals_transformers(api, base, hf, tokenizer):
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt).input_ids
        expected = tokenizer.decode(greedy(hf, ids, 12), skip_special_tokens=True)
        reply = api.completions.create(model=base, prompt=prompt, max_tokens=12, temperature=0)
        assert reply.choices[0].text == expected
        assert reply.usage.prompt_tokens == len(ids)
    # token ids and a list of prompts, as OpenAI accepts them
    ids = [tokenizer(p).input_ids for p in PROMPTS[:2]]
    reply = api.completions.create(model=base, prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in reply.choices] == [tokenizer.decode(greedy(hf, i, 6), skip_special_tokens=True)
                                               for i in ids]


def test_echo_logprobs_equal_transformers_log_softmax(api, base, hf, tokenizer):
    ids = tokenizer("Every machine hosts a span of transformer blocks").input_ids
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [reference[i - 1, ids[i]].item() for i in range(1, len(ids))]
    for max_tokens in (0, 1):  # what lm-eval's local-completions sends to score a text
        reply = api.completions.create(model=base, prompt=ids, max_tokens=max_tokens, echo=True, logprobs=1,
                                       temperature=0)
        logprobs = reply.choices[0].logprobs
        assert len(logprobs.tokens) == len(ids) + max_tokens
        assert logprobs.token_logprobs[0] is None
        assert max(abs(a - b) for a, b in zip(logprobs.token_logprobs[1:len(ids)], expected)) <= 1e-4
        for position in range(1, len(ids)):
            best = reference[position - 1].max().item()
            assert abs(max(logprobs.top_logprobs[position].values()) - best) <= 1e-4
        assert logprobs.text_offset == sorted(logprobs.text_offset)
    generated = logprobs.token_logprobs[-1]
    with torch.no_grad():
        last = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    assert abs(generated - last.max().item()) <= 1e-4  # the greedy token's own log-prob


def test_chat_streaming_follows_the_template_and_ends_with_done(swarm, api, base, hf, tokenizer):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a swarm?"}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False).input_ids
    expected = tokenizer.decode(greedy(hf, ids, 10), skip_special_tokens=True)
    stream = api.chat.completions.create(model=base, messages=messages, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) >= 3
    assert "".join(contents) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.prompt_tokens == len(ids)
    # the raw stream: server-sent events ending in [DONE]
    with httpx.stream("POST", f"{swarm.http_url}/v1/chat/completions", headers=auth(),
                      json={"model": base, "messages": messages, "max_tokens": 4, "stream": True}, timeout=60) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_stop_cuts_before_the_stop_sequence(api, base, hf, tokenizer):
    ids = tokenizer(PROMPTS[2]).input_ids
    text = tokenizer.decode(greedy(hf, ids, 24), skip_special_tokens=True)
    stop = text[6:9]
    assert stop.strip(), text
    reply = api.completions.create(model=base, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop, "§§"])
    assert reply.choices[0].text == text[:text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = api.completions.create(model=base, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop,
                                      stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == text[:text.index(stop)]


def test_errors_have_openais_shape(swarm, api, base):
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=base, prompt="hi", max_tokens=2, temperature=7)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        api.completions.create(model=base, prompt="hi", max_tokens=10 ** 6)
    assert long.value.body["code"] == "context_length_exceeded"
    wrong = openai.OpenAI(base_url=f"{swarm.http_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert set(refused.value.body) == {"message", "type", "param", "code"}
    for path in ("/v1/models", "/metrics", "/"):  # with the swarm's token set, nothing answers without it
        reply = httpx.get(f"{swarm.http_url}{path}", timeout=30)
        assert reply.status_code == 401, path
        assert reply.json()["error"]["code"] == "invalid_api_key"
    # the dashboard's cookie carries the token percent-encoded ("%61" is "a")
    assert httpx.get(f"{swarm.http_url}/v1/models", cookies={"tsotsa_key": "%61" + TOKEN[1:]}, timeout=30).is_success
    assert httpx.get(f"{swarm.http_url}/v1/models", cookies={"tsotsa_key": TOKEN + "x"}, timeout=30).status_code == 401


def test_four_concurrent_streams_are_served_at_once(api, base, hf, tokenizer):
    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    def one(index: int) -> str:
        pieces = []
        for chunk in api.completions.create(model=base, prompt=PROMPTS[index], max_tokens=24, temperature=0,
                                            stream=True):
            if chunk.choices and chunk.choices[0].text:
                with lock:
                    events.append(("token", index))
                pieces.append(chunk.choices[0].text)
        with lock:
            events.append(("end", index))
        return "".join(pieces)

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(one, range(4)))
    for index, text in enumerate(texts):
        assert text == tokenizer.decode(greedy(hf, tokenizer(PROMPTS[index]).input_ids, 24), skip_special_tokens=True)
    # served concurrently: some request produced tokens while another one was still producing
    open_streams, overlapped = set(), False
    for kind, index in events:
        if kind == "token":
            open_streams.add(index)
            overlapped = overlapped or len(open_streams) > 1
        else:
            open_streams.discard(index)
    assert overlapped, events


def test_a_client_gone_mid_stream_leaves_no_session_on_the_peers(swarm, api, base):
    before = counter(scrape(swarm), "tsotsa:request_success_total", finished_reason="abort")
    stream = api.completions.create(model=base, prompt=PROMPTS[3], max_tokens=1500, temperature=0, stream=True)
    for received, _ in enumerate(stream):
        if received == 3:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while sum(open_sessions(peer.address) for peer in swarm.peers):
        assert time.monotonic() < deadline, "sessions still open on the peers a minute after the client left"
        time.sleep(0.2)
    while counter(scrape(swarm), "tsotsa:request_success_total", finished_reason="abort") == before:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_metrics_parse_and_move_after_a_generation(swarm, api, base):
    before = counter(scrape(swarm), "tsotsa:generation_tokens_total")
    api.completions.create(model=base, prompt="hello", max_tokens=5, temperature=0)
    families = {family.name: family for family in text_string_to_metric_families(scrape_text(swarm))}
    assert counter(families, "tsotsa:generation_tokens_total") >= before + 5
    assert "tsotsa:time_to_first_token_seconds" in families
    assert counter(families, "tsotsa:training_rounds_done", run=RUN) == 1


def test_the_adapter_is_served_by_name(api, base, swarm):
    plain = api.completions.create(model=base, prompt="the color of", max_tokens=4, temperature=0, logprobs=0)
    for name in (f"{base}:{RUN}", RUN):
        adapted = api.completions.create(model=name, prompt="the color of", max_tokens=4, temperature=0, logprobs=0)
        assert adapted.model == name
        assert adapted.choices[0].logprobs.token_logprobs != plain.choices[0].logprobs.token_logprobs


def test_tsotsa_serve_standalone_and_503_without_peers(swarm, api, base, chat_model, tmp_path):
    serve = ManagedProcess("serve", [*cli("tsotsa"), "serve", "--coordinator", swarm.coordinator_address,
                                     "--port", "0"], {"TSOTSA_TOKEN": TOKEN})
    try:
        url = serve.wait_for(HTTP_READY).group(1)
        standalone = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
        reply = standalone.completions.create(model=base, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert reply.choices[0].text == api.completions.create(model=base, prompt=PROMPTS[0], max_tokens=8,
                                                               temperature=0).choices[0].text
    finally:
        serve.terminate()
    alone = LocalSwarm(chat_model, http=True)  # a coordinator with no peers yet
    try:
        alone.start_coordinator()
        lonely = openai.OpenAI(base_url=f"{alone.http_url}/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as unavailable:
            lonely.completions.create(model=alone.model_id, prompt="hi", max_tokens=2)
        assert unavailable.value.status_code == 503
        assert "no route" in unavailable.value.body["message"]
    finally:
        alone.stop()


def open_sessions(address: str) -> int:
    with open_channel(address, TOKEN) as channel:
        return pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=10).open_sessions


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def scrape_text(swarm: LocalSwarm) -> str:
    reply = httpx.get(f"{swarm.http_url}/metrics", headers=auth(), timeout=30)
    reply.raise_for_status()
    return reply.text


def scrape(swarm: LocalSwarm) -> dict:
    return {family.name: family for family in text_string_to_metric_families(scrape_text(swarm))}


def counter(families: dict, name: str, **labels: str) -> float:
    """The value of a sample (a counter's `_total`, a gauge) with these labels; 0 when absent."""
    family_name = name.removesuffix("_total")
    family = families.get(family_name) or families.get(name)
    if family is None:
        return 0.0
    return sum(sample.value for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))
