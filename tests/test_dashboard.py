"""The live dashboard judged in a real browser (headless Chromium, driven by selenium) against a live swarm.

One swarm with a token (so the page's key field is exercised), two peers and a two-round fine-tuning run;
the HTTP API runs as its own process (`tsotsa serve`). The browser logs in with the token, then must show
what the swarm is: both peers with their addresses and what their `Info` says, every block covered, the
run's rounds and one loss point per finite loss (at the coordinator's values), and a streamed completion
equal to the API's non-streamed greedy one. Then a peer is stopped and the page must turn its blocks red
by itself (EventSource, no reload) and drop the peer once its record expires; last the coordinator is
killed, and the page must say so and keep the map from the API's own DHT view.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tsotsa.api.dashboard import coverage, run_json
from tsotsa.coordinator_client import CoordinatorClient
from tsotsa.local_swarm import HTTP_READY, LocalSwarm, ManagedProcess
from tsotsa.rpc import open_channel
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

from conftest import cli, finish

TOKEN, ADMIN, RUN = "dashboard-token", "dashboard-admin", "dash-run"
ROUNDS = 2
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROWS = [{"prompt": f"the color of {thing} is", "completion": f" {color}"}
        for thing, color in [("snow", "white"), ("grass", "green"), ("sky", "blue"), ("coal", "black")]]

# One atomic read of what the page shows (the page redraws every ~2 s: element handles would go stale).
SNAPSHOT = """
const all = s => [...document.querySelectorAll(s)];
const run = document.querySelector(`.run[data-run="${arguments[0]}"]`);
return {
  login: !!document.getElementById('token'),
  loginMessage: (document.getElementById('login-message') || {}).textContent,
  summary: (document.getElementById('coverage-summary') || {}).textContent,
  blocks: all('#strip .block').map(b => ({block: Number(b.dataset.block), gap: b.classList.contains('gap')})),
  peers: all('#peers-body tr').map(r => Object.assign({id: r.dataset.peerId, state: r.dataset.state},
                                                      Object.fromEntries([...r.cells].map(c => [c.dataset.field, c.textContent])))),
  run: run && {done: run.querySelector('.rounds-done').dataset.done, total: run.querySelector('.rounds-done').dataset.total,
               state: run.querySelector('.run-state').textContent,
               train: [...run.querySelectorAll('circle.loss-point.train')].map(c => [Number(c.dataset.round), Number(c.dataset.loss)]),
               eval: [...run.querySelectorAll('circle.loss-point.eval')].map(c => [Number(c.dataset.round), Number(c.dataset.loss)])},
  live: (document.getElementById('live-status') || {dataset: {}}).dataset.mode,
  coordinatorError: (e => e && !e.hidden ? e.textContent : null)(document.getElementById('coordinator-error')),
  completion: (document.getElementById('completion') || {}).textContent,
  completionState: (document.getElementById('completion-status') || {dataset: {}}).dataset.state,
  completionStatus: (document.getElementById('completion-status') || {}).textContent,
};
"""


def browser_paths() -> tuple[str, str]:
    """Chromium and chromedriver; without them the test skips only for a user who could not install them."""
    chromium = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    driver = shutil.which("chromedriver") or (CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else None)
    if chromium and driver:
        return chromium, driver
    missing = " and ".join(name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path)
    if os.geteuid() != 0:
        pytest.skip(f"{missing} not installed (apt-get install chromium chromium-driver as root; `make test` does)")
    pytest.fail(f"{missing} not installed: `make test` installs them as root (apt-get install -y chromium chromium-driver)")


@pytest.fixture(scope="module")
def swarm(tiny_model, tmp_path_factory) -> Iterator[LocalSwarm]:
    """Two peers under a swarm token; the run is launched here and trains while the API and browser start."""
    swarm = LocalSwarm(tiny_model, cache_dir=tmp_path_factory.mktemp("cache"), token=TOKEN, admin_token=ADMIN)
    try:
        swarm.start_coordinator()
        swarm.add_peers(["0:2", "2:4"])
        data = tmp_path_factory.mktemp("data") / "colors.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
        with CoordinatorClient(swarm.coordinator_address, token=TOKEN, admin_token=ADMIN) as client:
            client.create_run(RUN, pb.RunConfig(rounds=ROUNDS, steps_per_round=1, micro_batch=2, seq_len=32, lora_r=4,
                                                lora_alpha=8, target_modules=["q_proj", "v_proj"], lr=1e-2), data, data)
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def http_url(swarm, tmp_path_factory) -> Iterator[str]:
    """`tsotsa serve` as its own process, as an operator runs it; its base URL (no /v1)."""
    process = ManagedProcess("tsotsa serve", [*cli("tsotsa"), "serve", "--coordinator", swarm.coordinator_address,
                                              "--port", "0"],
                             env={"TSOTSA_TOKEN": TOKEN, "TSOTSA_CACHE": str(tmp_path_factory.mktemp("serve-cache"))})
    try:
        yield process.wait_for(HTTP_READY, timeout=180).group(1)
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1300"):
        options.add_argument(argument)
    options.binary_location = chromium
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver, what: str, condition, timeout: float = 60.0) -> dict:
    """Polls the page's snapshot until `condition(snapshot)` holds (bounded); fails with the last snapshot."""
    from selenium.common.exceptions import WebDriverException

    deadline, snapshot = time.monotonic() + timeout, None
    while True:
        try:
            snapshot = driver.execute_script(SNAPSHOT, RUN)
        except WebDriverException:  # the page is (re)loading
            pass
        else:
            if condition(snapshot):
                return snapshot
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not show {what} within {timeout:g} s; it shows:\n"
                                 f"{json.dumps(snapshot, indent=1)[:4000]}")
        time.sleep(0.4)


def api(url: str, path: str, body: dict | None = None, token: str | None = TOKEN):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    print(f"dashboard screenshot: {path}")
    artifacts = os.environ.get("TSOTSA_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        print(f"dashboard screenshot copied to {shutil.copy(path, Path(artifacts) / name)}")
    return path


def finished_run(swarm: LocalSwarm, timeout: float = 240.0) -> pb.RunInfo:
    with CoordinatorClient(swarm.coordinator_address, token=TOKEN) as client:
        return finish(client, RUN, timeout)


def max_sessions(address: str) -> int:
    """The peer's own cap (from its memory unless --max-sessions is given), as its Info says."""
    with open_channel(address, TOKEN) as channel:
        return pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=10).max_sessions


def test_dashboard_in_a_browser_shows_the_swarm_and_follows_it(swarm, http_url, browser, tmp_path):
    # Without the key: the page asks for it, a wrong one is refused, the right one opens the dashboard.
    with pytest.raises(urllib.error.HTTPError) as refused:
        api(http_url, "/api/state", token=None)
    assert refused.value.code == 401
    browser.get(http_url + "/")
    assert wait_until(browser, "the key field", lambda s: s["login"], 10)
    browser.find_element("id", "token").send_keys("not-the-token")
    browser.find_element("id", "login").click()
    wait_until(browser, "the key refused", lambda s: s["login"] and "not accepted" in s["loginMessage"], 10)
    field = browser.find_element("id", "token")
    field.clear()
    field.send_keys(TOKEN)
    browser.find_element("id", "login").click()

    # Both peers, with their addresses and their own Info (memory, uptime, sessions); every block covered.
    peers = {peer.peer_id: peer for peer in swarm.peers}
    shown = wait_until(browser, "both peers answering and every block covered", lambda s: not s["login"]
                       and len(s["blocks"]) == 4 and not any(b["gap"] for b in s["blocks"])
                       and {p["id"] for p in s["peers"]} == set(peers)
                       and all(p["state"] == "online" and p["rss"] != "—" for p in s["peers"]))
    for row in shown["peers"]:
        peer = peers[row["id"]]
        assert row["address"] == peer.address and row["blocks"] == f"{peer.start}:{peer.end}"
        assert row["rss"].endswith(("MiB", "GiB")) and row["uptime"] != "—"
        assert row["sessions"].endswith(f" / {max_sessions(peer.address)}") and row["dtype"] == "float32 / none"
    assert shown["summary"].startswith("every block is served")
    assert wait_until(browser, "the live event stream", lambda s: s["live"] == "live", 15)

    # The run: its rounds and one point per finite loss, at the coordinator's values.
    info = finished_run(swarm)
    shown = wait_until(browser, f"run {RUN} with {ROUNDS} of {ROUNDS} rounds",
                       lambda s: s["run"] and s["run"]["done"] == str(ROUNDS) and s["run"]["state"] == "finished")
    assert shown["run"]["total"] == str(ROUNDS)
    for kind, losses in (("train", [(r.round, r.train_loss) for r in info.rounds]),
                         ("eval", [(r.round, r.eval_loss) for r in info.rounds])):
        finite = [(round_, value) for round_, value in losses if math.isfinite(value)]
        assert finite, f"the run has no finite {kind} loss: nothing to draw"
        points = sorted(shown["run"][kind])
        assert [round_ for round_, _ in points] == [round_ for round_, _ in finite], kind
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(points, finite)), (points, finite)

    # The prompt box streams through /v1/completions: the same text as the API's greedy answer.
    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys("the color of snow is")
    tokens = browser.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("8")
    browser.find_element("id", "generate").click()
    streamed = wait_until(browser, "a finished completion", lambda s: s["completionState"] in ("done", "error"), 60)
    assert streamed["completionState"] == "done", streamed["completionStatus"]
    expected = api(http_url, "/v1/completions", {"model": swarm.model_id, "prompt": "the color of snow is",
                                                 "max_tokens": 8, "temperature": 0})["choices"][0]["text"]
    assert expected and streamed["completion"] == expected
    save_screenshot(browser, tmp_path, "dashboard.png")

    # The state as JSON: strict (no NaN), the same peers and run.
    state = api(http_url, "/api/state")
    assert {p["peer_id"] for p in state["peers"]} == set(peers) and state["gaps"] == []
    assert [run["name"] for run in state["runs"]] == [RUN] and state["runs"][0]["rounds_total"] == ROUNDS

    # A peer stops: its blocks turn red on the page by themselves, and it leaves once its record expires.
    stopped = next(peer for peer in swarm.peers if peer.start == 2)
    swarm.stop_peer(stopped)
    gone = set(range(stopped.start, stopped.end))
    shown = wait_until(browser, f"a gap at blocks {sorted(gone)}",
                       lambda s: {b["block"] for b in s["blocks"] if b["gap"]} == gone)
    assert "blocks with no online peer: 2, 3" in shown["summary"]
    save_screenshot(browser, tmp_path, "dashboard-gap.png")
    shown = wait_until(browser, "the stopped peer's record expiring",
                       lambda s: {p["id"] for p in s["peers"]} == set(peers) - {stopped.peer_id})
    assert {b["block"] for b in shown["blocks"] if b["gap"]} == gone and shown["coordinatorError"] is None

    # The coordinator dies: the page says so and keeps the map, now from the API's own DHT view.
    swarm.kill_coordinator()
    shown = wait_until(browser, "the coordinator's failure", lambda s: s["coordinatorError"] is not None, 30)
    assert "DHT view" in shown["coordinatorError"]
    assert {p["id"] for p in shown["peers"]} == set(peers) - {stopped.peer_id}
    assert {b["block"] for b in shown["blocks"] if b["gap"]} == gone


def test_state_json_has_no_nan_and_counts_only_answering_online_peers():
    """NaN losses (unknown train loss, no eval set) become null; a peer whose record says online but that
    does not answer covers nothing; joining and draining peers cover nothing either."""
    run = pb.RunInfo(name="r", state="running", config_json=json.dumps({"rounds": 3, "steps_per_round": 2}),
                     rounds_done=1, rounds=[pb.RoundInfo(round=1, state="done", train_loss=2.5, eval_loss=math.nan),
                                            pb.RoundInfo(round=2, state="running", train_loss=math.nan,
                                                         eval_loss=math.inf)])
    shown = json.loads(json.dumps(run_json(run), allow_nan=False))
    assert shown["rounds_total"] == 3 and shown["rounds_done"] == 1
    assert [(r["train_loss"], r["eval_loss"]) for r in shown["rounds"]] == [(2.5, None), (None, None)]

    def peer(peer_id, start, end, state, reachable):
        return {"peer_id": peer_id, "start": start, "end": end, "state": state, "reachable": reachable,
                "throughput": 10.0}

    blocks = coverage([peer("a", 0, 2, "online", True), peer("b", 2, 4, "online", False),
                       peer("c", 3, 5, "joining", None), peer("d", 4, 6, "draining", True),
                       peer("e", 5, 6, "online", True)], 6)
    assert [b["gap"] for b in blocks] == [False, False, True, True, True, False]
    assert blocks[2]["unreachable"] == ["b"] and blocks[4]["draining"] == ["d"] and blocks[0]["throughput"] == 10.0
