"""Observability: a peer's /metrics page against what it really served, the training runs' metrics against a
real coordinator, the page's token and TLS rules, and `--log-format json` output of real processes."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.local_swarm import COORDINATOR_COMMAND, PEER_COMMAND, LocalSwarm, ManagedProcess
from tsotsa.metrics import RUN_STATES, TrainingCollector
from tsotsa.metrics_server import METRICS_READY, serve_metrics
from tsotsa.rpc import open_channel
from tsotsa.tls import TlsSettings, init_ca, issue
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

from conftest import cli, connect
from finetune_oracle import write_color_task

TOKEN, ADMIN = "metrics-swarm-token", "metrics-admin"
RUN = "metered"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition page, by (name, sorted labels)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape(url: str, token: str | None = TOKEN, context: ssl.SSLContext | None = None) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        assert response.status == 200
        return response.read().decode()


def value(page: dict, name: str, **labels: str) -> float:
    return page[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def swarm(tiny_model: Path, tmp_path_factory) -> Iterator[LocalSwarm]:
    """A token-ed swarm of two peers with /metrics pages, whose coordinator can launch runs."""
    swarm = LocalSwarm(tiny_model, cache_dir=tmp_path_factory.mktemp("cache"), token=TOKEN, admin_token=ADMIN)
    try:
        swarm.start_coordinator()
        swarm.add_peers(["0:2", "2:4"], "--metrics-port", "0")
    except BaseException:
        swarm.stop()
        raise
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def urls(swarm: LocalSwarm) -> list[str]:
    """Each peer's metrics URL, from the line it announced."""
    found = []
    for peer in swarm.peers:
        match = peer.process.wait_for(METRICS_READY, timeout=5)
        assert match.group(1) == "http" and match.group(2) == "127.0.0.1"
        found.append(match.group(0).removeprefix("metrics at "))
    return found


def peer_info(address: str) -> pb.PeerInfo:
    channel = open_channel(address, TOKEN)
    try:
        return pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=10)
    finally:
        channel.close()


def test_a_generation_moves_the_peers_counters_and_frees_its_session(swarm, urls, tmp_path_factory):
    before = [samples(scrape(url)) for url in urls]
    with connect(swarm, tmp_path_factory, token=TOKEN) as model:
        prompt = model.tokenizer("the color of snow is", return_tensors="pt").input_ids
        output = model.generate(prompt, max_new_tokens=6)
    generated = output.shape[1] - prompt.shape[1]
    assert generated >= 2
    # one prefill step, then one decode step per token after the first; batch 1
    steps, tokens = generated, prompt.shape[1] + generated - 1
    for url, old, peer in zip(urls, before, swarm.peers):
        deadline = time.monotonic() + 10  # the peer frees the session when its stream ends, just after
        while (page := samples(scrape(url))) and value(page, "tsotsa:peer_sessions_open") and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert value(page, "tsotsa:peer_sessions_open") == 0
        assert value(page, "tsotsa:kv_cache_bytes_used") == 0
        assert value(page, "tsotsa:peer_inference_steps_total") - value(old, "tsotsa:peer_inference_steps_total") \
            == steps
        assert value(page, "tsotsa:peer_tokens_served_total") - value(old, "tsotsa:peer_tokens_served_total") \
            == tokens
        assert value(page, "tsotsa:peer_step_latency_seconds_count") - \
            value(old, "tsotsa:peer_step_latency_seconds_count") == steps
        assert value(page, "tsotsa:peer_rss_bytes") > 50 << 20  # torch alone is more
        assert value(page, "tsotsa:peer_uptime_seconds") > 0
        # Info gives the dashboard the same numbers
        info = peer_info(peer.address)
        assert value(page, "tsotsa:kv_cache_bytes_budget") == info.cache_bytes_limit >= 256 << 20  # from memory
        assert value(page, "tsotsa:peer_sessions_max") == info.max_sessions >= 4
        assert info.steps_served == value(page, "tsotsa:peer_inference_steps_total")
        assert info.tokens_served == value(page, "tsotsa:peer_tokens_served_total")
        assert info.rss_bytes > 50 << 20 and info.uptime_seconds > 0


def test_the_page_needs_the_swarm_token(urls):
    for token in (None, "wrong-token"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(urls[0], token=token)
        assert refused.value.code == 401
    assert "tsotsa:peer_sessions_open" in scrape(urls[0])


@pytest.fixture(scope="module")
def finished_run(swarm, tmp_path_factory) -> tuple[pb.RunInfo, dict, list[dict]]:
    """A one-round, one-step run; with the training metrics of the coordinator before it was launched and the
    peers' pages before it."""
    data = write_color_task(tmp_path_factory.mktemp("data") / "colors.jsonl")
    config = pb.RunConfig(rounds=1, steps_per_round=1, micro_batch=2, grad_accum=1, seq_len=64, lora_r=4,
                          lora_alpha=8.0, target_modules=["q_proj", "v_proj"], lr=1e-2, seed=0)
    with CoordinatorClient(swarm.coordinator_address, token=TOKEN, admin_token=ADMIN) as client:
        registry = CollectorRegistry()
        registry.register(TrainingCollector(client.runs))
        before = samples(generate_latest(registry).decode())
        pages = [samples(scrape(peer_url)) for peer_url in _urls(swarm)]
        client.create_run(RUN, config, data, data)
        deadline = time.monotonic() + 120
        while (info := client.run(RUN)).state not in ("finished", "failed", "stopped"):
            assert time.monotonic() < deadline, info
            time.sleep(0.3)
    assert info.state == "finished", info.message
    return info, before, pages


def _urls(swarm: LocalSwarm) -> list[str]:
    return [peer.process.wait_for(METRICS_READY, timeout=5).group(0).removeprefix("metrics at ")
            for peer in swarm.peers]


def test_training_collector_reads_a_real_coordinators_runs(swarm, finished_run):
    info, before, _ = finished_run
    assert value(before, "tsotsa:training_runs_reachable") == 1
    assert not [key for key in before if key[0] == "tsotsa:training_rounds_done"]  # no run yet
    with CoordinatorClient(swarm.coordinator_address, token=TOKEN) as client:
        registry = CollectorRegistry()
        registry.register(TrainingCollector(client.runs))
        page = samples(generate_latest(registry).decode())
    last = info.rounds[-1]
    assert value(page, "tsotsa:training_rounds_done", run=RUN) == 1
    assert value(page, "tsotsa:training_loss", run=RUN) == pytest.approx(last.train_loss)
    assert value(page, "tsotsa:training_eval_loss", run=RUN) == pytest.approx(last.eval_loss)
    assert 0 < last.train_loss < 100
    states = {state: value(page, "tsotsa:training_run_state", run=RUN, state=state) for state in RUN_STATES}
    assert states == {state: 1 if state == "finished" else 0 for state in RUN_STATES}


def test_training_collector_survives_an_unreachable_coordinator():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with CoordinatorClient(f"127.0.0.1:{port}", timeout=5) as client:
        registry = CollectorRegistry()
        registry.register(TrainingCollector(client.runs))
        other = Counter("tsotsa:other", "Beside the runs.", registry=registry)
        other.inc(3)
        page = samples(generate_latest(registry).decode())
    assert value(page, "tsotsa:training_runs_reachable") == 0
    assert value(page, "tsotsa:other_total") == 3  # the rest of the page is still served


def test_peers_count_training_micro_batches_and_report_the_adapter(swarm, finished_run):
    info, _, before = finished_run
    micro_batches = info.rounds[-1].samples // 2  # micro_batch 2
    assert micro_batches >= 1
    for url, old, peer in zip(_urls(swarm), before, swarm.peers):
        page = samples(scrape(url))
        for phase in ("forward", "backward"):
            moved = value(page, "tsotsa:peer_train_micro_batches_total", phase=phase) - \
                value(old, "tsotsa:peer_train_micro_batches_total", phase=phase)
            assert moved == micro_batches, (phase, peer.start)
        # the round's evaluation runs through Forward calls
        assert value(page, "tsotsa:peer_forward_calls_total") > value(old, "tsotsa:peer_forward_calls_total")
        assert value(page, "tsotsa:peer_adapters_served") == 1
        assert list(peer_info(peer.address).adapters) == [RUN]


@pytest.fixture(scope="module")
def lab_tls(tmp_path_factory) -> tuple[TlsSettings, TlsSettings]:
    """A lab CA with a server and a scraper certificate."""
    directory = tmp_path_factory.mktemp("tls")
    init_ca(directory)
    settings = []
    for name in ("server", "scraper"):
        key, cert = issue(directory, name, ["127.0.0.1"])
        settings.append(TlsSettings.load(cert, key, directory / "ca.crt"))
    return settings[0], settings[1]


def test_the_page_over_mutual_tls(lab_tls):
    server_tls, scraper_tls = lab_tls
    registry = CollectorRegistry()
    Counter("tsotsa:probe", "A value to find.", registry=registry).inc(7)
    server = serve_metrics(registry, "127.0.0.1", 0, token=TOKEN, tls=server_tls)
    try:
        assert server.url == f"https://127.0.0.1:{server.port}/metrics"
        context = ssl.create_default_context(cafile=str(server_tls.ca_path))
        context.load_cert_chain(str(scraper_tls.cert_path), str(scraper_tls.key_path))
        assert value(samples(scrape(server.url, context=context)), "tsotsa:probe_total") == 7
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(server.url, token=None, context=context)
        assert refused.value.code == 401
        anonymous = ssl.create_default_context(cafile=str(server_tls.ca_path))  # no client certificate
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            scrape(server.url, context=anonymous)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            scrape(f"http://127.0.0.1:{server.port}/metrics")  # plain HTTP is not answered
        # a client that connects and says nothing holds up no one: the next scrape is answered
        with socket.create_connection(("127.0.0.1", server.port)):
            assert value(samples(scrape(server.url, context=context)), "tsotsa:probe_total") == 7
    finally:
        server.close()


def test_a_taken_metrics_port_is_one_line():
    """Refused before the peer even looks for its coordinator (none listens at port 1)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*cli("tsotsa-peer"), "join", "--coordinator", "127.0.0.1:1",
                                 "--metrics-port", str(port), "--token", TOKEN], capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot serve metrics on 127.0.0.1:{port}"), result.stderr


def json_lines(process: ManagedProcess) -> list[dict]:
    """Every line the process wrote, each of which must be one JSON object with the four fields."""
    entries = []
    for line in process.lines:
        if not line.strip():
            continue
        entry = json.loads(line)  # raises on a line that is not JSON
        assert {"time", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    return entries


def wait_for_message(process: ManagedProcess, pattern: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in json_lines(process):
            if pattern in entry["message"]:
                return entry
        assert process.process.poll() is None, process.output()
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in:\n{process.output()}")


def test_json_log_format_of_a_coordinator_and_a_peer(tiny_model, tmp_path):
    coordinator = ManagedProcess("json coordinator", [
        *COORDINATOR_COMMAND, "up", "--model", str(tiny_model), "--port", "0", "--state-dir",
        str(tmp_path / "coordinator"), "--log-format", "json"])
    peer = None
    try:
        ready = wait_for_message(coordinator, "coordinator of ")
        assert ready["level"] == "INFO" and ready["logger"] == "tsotsa.coordinator"
        address = ready["message"].split(" at ")[1].split(";")[0]
        with CoordinatorClient(address) as client:  # a deliberate warning: the coordinator logs each report
            client.report_peer(client.model_info().model_id, "12D3KooWNotARealPeer", 0, 1, "answered wrongly")
        warned = wait_for_message(coordinator, "a client reports peer")
        assert warned["level"] == "WARNING" and warned["logger"] == "tsotsa.coordinator.service"
        peer = ManagedProcess("json peer", [
            *PEER_COMMAND, "join", "--coordinator", address, "--model", str(tiny_model), "--blocks", "0:4",
            "--threads", "1", "--state-dir", str(tmp_path / "peer"), "--metrics-port", "0"],
            {"TSOTSA_LOG_FORMAT": "json"})  # the environment variable sets it too
        serving = wait_for_message(peer, "serving blocks 0:4 of ")
        assert serving["logger"] == "tsotsa.peer"
        assert METRICS_READY.search(wait_for_message(peer, "metrics at ")["message"])
        assert peer.terminate() == 0
        assert "left the swarm" in json_lines(peer)[-1]["message"]
    finally:
        if peer is not None:
            peer.kill()
        coordinator.terminate()
    json_lines(coordinator)  # every line of both processes, to the end, parsed as JSON


def test_a_bad_log_format_is_one_line():
    result = subprocess.run([*cli("tsotsa-coordinator"), "up", "--model", "/nonexistent", "--log-format", "yaml"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: unknown --log-format 'yaml'; expected one of text, json", result.stderr


def test_off_a_terminal_the_peer_prints_only_rare_plain_lines():
    from tsotsa.peer.display import PeerDisplay

    lines: list[str] = []
    quiet = PeerDisplay(lines.append, live=False)  # the defaults: a progress line only after 10 s of loading
    with quiet.blocks("loading blocks 0:4", 4) as progress:
        for _ in range(4):
            progress.advance(3 << 20)
    quiet.serving("0:4", 0, 32, 0)
    quiet.serving("0:4", 1, 32, 500)
    assert lines == []

    chatty = PeerDisplay(lines.append, live=False, progress_every=0.0, summary_every=0.0)
    with chatty.blocks("loading blocks 0:4", 4) as progress:
        progress.advance(3 << 20)
        progress.advance(3 << 20)
    assert lines == ["loading blocks 0:4: 1/4 (3.0 MiB)", "loading blocks 0:4: 2/4 (6.0 MiB)"]
    lines.clear()
    chatty.serving("0:4", 0, 32, 100)  # the first heartbeat only starts the count
    time.sleep(0.01)
    chatty.serving("0:4", 2, 32, 100)  # nothing served since: no line
    time.sleep(0.01)
    chatty.serving("0:4", 1, 32, 160)
    assert len(lines) == 1 and lines[0].startswith("blocks 0:4: 1 sessions open, 160 tokens served, "), lines
