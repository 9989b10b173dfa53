"""The swarm as an lm-eval model (tsotsa/evaluation/backend.py) against lm-eval's own `hf` backend on the
same checkpoint in this process: per-request loglikelihoods (1e-4 in fp32) and greedy flags, rolling
loglikelihoods over several windows, `generate_until` with its stop strings honoured, and the metrics of
the shipped local tasks and of a user's task YAML (`dataset_path: json`, local `data_files`); then
`tsotsa eval run` and lm-eval's own command line through `tsotsa-lm-eval`, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from conftest import cli, swarm_fixture
from tsotsa.evaluation.backend import SwarmLM
from tsotsa.evaluation.run import TASKS_DIR, EvalOptions, evaluate, shipped_tasks

MAX_LENGTH = 48  # small, so that rolling loglikelihoods take several windows
PAIRS = [("the color of the sky is", " blue"), ("Once upon", " a time there was"), ("", "hello world"),
         ("A B C ", "D E F"), ("Every lab machine hosts a span of blocks " * 6, "and serves them")]
TEXTS = ["Every lab machine runs a peer.", "A client embeds its prompt and samples the next token. " * 8]
GENERATIONS = [("the color of the sky is", {"until": ["."], "max_gen_toks": 12, "do_sample": False}),
               ("Once upon", {"until": ["\n", " the"], "max_gen_toks": 16}),
               ("A B C", {"until": ["zzz"], "max_gen_toks": 10, "temperature": 0.0})]

swarm = swarm_fixture(["0:2", "2:4"], http=True)  # the HTTP API for lm-eval's `local-completions`


@pytest.fixture(scope="module")
def hf(tiny_model: Path) -> HFLM:
    return HFLM(pretrained=str(tiny_model), dtype="float32", device="cpu", batch_size=4, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def lm(model) -> SwarmLM:
    return SwarmLM(model=model, batch_size=3, max_length=MAX_LENGTH)


def instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_loglikelihoods_equal_the_hf_backend(hf, lm):
    expected = hf.loglikelihood(instances("loglikelihood", PAIRS), disable_tqdm=True)
    got = lm.loglikelihood(instances("loglikelihood", PAIRS), disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(expected, got)) <= 1e-4, (expected, got)
    assert [a[1] for a in expected] == [b[1] for b in got]


def test_rolling_loglikelihoods_equal_the_hf_backend(hf, lm):
    assert len(lm.tok_encode(TEXTS[1])) > 2 * MAX_LENGTH  # several windows
    expected = hf.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in TEXTS]), disable_tqdm=True)
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in TEXTS]), disable_tqdm=True)
    assert max(abs(a - b) for a, b in zip(expected, got)) <= 1e-4, (expected, got)


def test_generate_until_equals_the_hf_backend_and_honours_until(hf, lm):
    expected = hf.generate_until(instances("generate_until", GENERATIONS), disable_tqdm=True)
    got = lm.generate_until(instances("generate_until", GENERATIONS), disable_tqdm=True)
    assert got == expected
    for text, (_, kwargs) in zip(got, GENERATIONS):
        assert not any(stop in text for stop in kwargs["until"]), text


def user_task(directory: Path) -> Path:
    """A task as a user writes one: `dataset_path: json` and a local `data_files`."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "yes_no.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in
                            [("is snow white", 0), ("is coal white", 1), ("is the sky blue", 0), ("is grass red", 1)]))
    (directory / "user_yes_no.yaml").write_text(f"""task: user_yes_no
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}?"
doc_to_choice: ["yes", "no"]
doc_to_target: "{{{{a}}}}"
metric_list:
  - metric: acc
""")
    return directory


def test_task_metrics_equal_the_hf_backend_on_local_tasks(hf, lm, tmp_path):
    assert {"tsotsa_colors", "tsotsa_colors_gen", "tsotsa_lab_qa", "tsotsa_lab_continue",
            "tsotsa_lab_texts"} <= set(shipped_tasks())  # multiple choice, short answers, generation, perplexity
    options = EvalOptions(tasks=[*shipped_tasks(), "user_yes_no"], include_paths=[user_task(tmp_path / "tasks")])
    expected, got = evaluate(hf, options)["results"], evaluate(lm, options)["results"]
    assert set(got) == set(options.tasks)
    for task, metrics in expected.items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and name != "sample_len":
                assert abs(got[task][name] - value) <= 1e-4 * max(1.0, abs(value)), (task, name, value, got[task][name])


def test_lm_evals_local_completions_against_the_http_api_gives_the_same_metrics(swarm, lm, tiny_model):
    """lm-eval's own OpenAI-completions client (echo + logprobs for loglikelihoods, `stop` for generations)
    against the swarm's HTTP API, with the checkpoint's tokenizer; BOS added, as the other backends do. At
    the model's full length every text is one rolling window (lm-eval's API client cuts later windows
    one token differently from its hf backend, which the tsotsa backend follows)."""
    from lm_eval.api.registry import get_model

    local = get_model("local-completions")(
        base_url=f"{swarm.http_url}/v1/completions", model=swarm.model_id, tokenizer=str(tiny_model),
        tokenizer_backend="huggingface", add_bos_token=True, num_concurrent=1, max_retries=1)
    full_length = SwarmLM(model=lm.model, batch_size=3)
    options = EvalOptions(tasks=["tsotsa_colors", "tsotsa_colors_gen", "tsotsa_lab_texts"], limit=8)
    expected, got = evaluate(full_length, options)["results"], evaluate(local, options)["results"]
    for task, metrics in expected.items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and name != "sample_len":
                assert abs(got[task][name] - value) <= 1e-4 * max(1.0, abs(value)), (task, name, value, got[task][name])


def test_eval_run_and_the_lm_eval_command_line_through_the_swarm(swarm, tmp_path):
    output = tmp_path / "results.json"
    run = subprocess.run([*cli("tsotsa"), "eval", "run", "--coordinator", swarm.coordinator_address,
                          "--tasks", "tsotsa_colors,user_yes_no", "--include-path", str(user_task(tmp_path / "t")),
                          "--limit", "4", "--output", str(output)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "tsotsa_colors" in run.stdout and "user_yes_no" in run.stdout and "acc" in run.stdout
    assert set(json.loads(output.read_text())["results"]) == {"tsotsa_colors", "user_yes_no"}
    wrapped = subprocess.run([sys.executable, "-m", "tsotsa.evaluation", "run", "--model", "tsotsa", "--model_args",
                              f"coordinator={swarm.coordinator_address}", "--tasks", "tsotsa_colors",
                              "--include_path", str(TASKS_DIR), "--limit", "4"],
                             capture_output=True, text=True, timeout=600)
    assert wrapped.returncode == 0, wrapped.stderr[-3000:]
    assert "tsotsa_colors" in wrapped.stdout and "acc" in wrapped.stdout
    unknown = subprocess.run([*cli("tsotsa"), "eval", "run", "--coordinator", swarm.coordinator_address,
                              "--tasks", "no_such_task_here"], capture_output=True, text=True, timeout=600)
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: no task named no_such_task_here")


def test_compare_of_the_given_swarm_reads_its_peers(swarm, tmp_path):
    """`tsotsa eval compare --variants swarm`: the swarm's own peers, evaluated as they are; their RSS is the
    current one they report (not processes of this machine's comparison)."""
    from tsotsa.evaluation.compare import CompareOptions, compare, parse_variants
    from tsotsa.evaluation.latency import LatencyProtocol

    options = CompareOptions(variants=parse_variants("swarm"), tasks=EvalOptions(tasks=["tsotsa_colors"], limit=4),
                             output_dir=tmp_path, coordinator=swarm.coordinator_address,
                             protocol=LatencyProtocol(new_tokens=3, warmup=0, repeats=1, concurrency=2))
    (row,) = compare(options, say=lambda line: None)["variants"]
    assert row["variant"] == "swarm" and row["backend"] == "swarm"
    assert [peer["blocks"] for peer in row["peers"]] == ["0:2", "2:4"]
    assert all(peer["rss_measured"] == "current" and peer["peak_rss_bytes"] > 0 for peer in row["peers"])
    assert row["results"]["tsotsa_colors"]["acc,none"] >= 0 and row["latency"]["token_ms"]["n"] == 2
