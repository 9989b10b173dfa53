"""Prometheus metrics of the swarm's processes, under the names serving engines use (vLLM's, `tsotsa:` prefix).

Why these names: dashboards and alerts written for vLLM (`vllm:num_requests_running`,
`vllm:time_to_first_token_seconds`, ...) then work for a tsotsa swarm by changing the prefix. Every class
takes an explicit `CollectorRegistry`: nothing registers on prometheus_client's global default registry,
so a process (or a test) may hold several independent sets, and what a `/metrics` page shows is exactly
what its server registered.

* `ServingMetrics`: the HTTP API server's requests and tokens (updated by its request handlers).
* `PeerMetrics`: one peer's sessions, KV cache, served steps and tokens, training micro-batches, memory;
  the gauges read the peer's live objects at scrape time, the counters count where the event happens.
* `TrainingCollector`: the coordinator's fine-tuning runs, read from the run store at scrape time.

Served over HTTP by `tsotsa.metrics_server.serve_metrics` (peers) or by the HTTP API's `/metrics`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tsotsa.v1 import tsotsa_pb2 as pb

logger = logging.getLogger(__name__)

PREFIX = "tsotsa:"
FINISHED_REASONS = ("stop", "length", "abort", "error")  # values of request_success's `finished_reason`
RUN_STATES = ("queued", "running", "waiting", "stopping", "stopped", "finished", "failed")  # pb.RunInfo.state

# Bucket boundaries in seconds, from a GPU peer on one machine (milliseconds) to CPU peers across a lab
# network with a long prompt or a queue in front (minutes).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                       30.0, 60.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServingMetrics:
    """The HTTP API server's metrics; its request handlers update them (vLLM's meanings):

    * `requests_running` — Gauge `tsotsa:num_requests_running`: requests generating now (inc at start, dec at end).
    * `requests_waiting` — Gauge `tsotsa:num_requests_waiting`: requests accepted but not generating yet (queued).
    * `prompt_tokens` — Counter `tsotsa:prompt_tokens_total`: prompt tokens of every request taken.
    * `generation_tokens` — Counter `tsotsa:generation_tokens_total`: tokens generated, over all requests.
    * `time_to_first_token` — Histogram `tsotsa:time_to_first_token_seconds`: from a request's arrival to its
      first generated token (queueing and prefill included).
    * `inter_token_latency` — Histogram `tsotsa:inter_token_latency_seconds`: between two consecutive tokens of
      one request (one observation per token after the first).
    * `request_latency` — Histogram `tsotsa:e2e_request_latency_seconds`: from arrival to the last token.
    * `request_success` — Counter `tsotsa:request_success_total{finished_reason}`: finished requests, by why they
      ended: `stop` (an EOS or stop sequence), `length` (max tokens), `abort` (the client went away), `error`.
      Every reason's series exists from the start (at 0), so rates over it are defined before the first one.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests_running = Gauge(f"{PREFIX}num_requests_running", "Requests generating now.",
                                      registry=registry)
        self.requests_waiting = Gauge(f"{PREFIX}num_requests_waiting", "Requests accepted, not generating yet.",
                                      registry=registry)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of the requests taken.",
                                     registry=registry)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.", registry=registry)
        self.time_to_first_token = Histogram(f"{PREFIX}time_to_first_token_seconds",
                                             "Seconds from a request's arrival to its first generated token.",
                                             buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(f"{PREFIX}inter_token_latency_seconds",
                                             "Seconds between consecutive tokens of one request.",
                                             buckets=INTER_TOKEN_BUCKETS, registry=registry)
        self.request_latency = Histogram(f"{PREFIX}e2e_request_latency_seconds",
                                         "Seconds from a request's arrival to its last token.",
                                         buckets=REQUEST_BUCKETS, registry=registry)
        self.request_success = Counter(f"{PREFIX}request_success", "Finished requests, by why they ended.",
                                       ["finished_reason"], registry=registry)
        for reason in FINISHED_REASONS:
            self.request_success.labels(reason)


class PeerMetrics:
    """One peer's metrics. Gauges read the live state through the callables given here, at scrape time, so they
    can never drift from it; the event counters are incremented by the RPC handlers where the event happens
    (peer/service.py, peer/training_rpcs.py):

    * `tsotsa:peer_sessions_open`, `tsotsa:peer_sessions_max` — inference sessions open now, and the cap.
    * `tsotsa:kv_cache_bytes_used`, `tsotsa:kv_cache_bytes_budget` — KV-cache bytes the open sessions reserved
      (each reserves what its cache reaches at its max_length), and the budget (`--cache-mib`).
    * `steps` — Counter `tsotsa:peer_inference_steps_total`: inference-session steps computed (prefill or decode).
    * `tokens` — Counter `tsotsa:peer_tokens_served_total`: token positions the span computed for inference
      (batch × length of every session step and every Forward call).
    * `step_latency` — Histogram `tsotsa:peer_step_latency_seconds`: one session step inside the peer, from
      the decoded request to the encoded answer (waiting for the runtime thread included).
    * `forward_calls` — Counter `tsotsa:peer_forward_calls_total`: stateless Forward calls (SwarmModel.forward,
      spot checks, evaluation).
    * `train_micro_batches` — Counter `tsotsa:peer_train_micro_batches_total{phase}`: training micro-batches,
      `phase` = `forward` (TrainForward) or `backward` (TrainBackward).
    * `batch_sessions` — Histogram `tsotsa:peer_batch_sessions`: sessions whose decode steps one pass over the
      blocks computed together (1: alone; peer/batching.py).
    * `link_steps` — Histogram `tsotsa:peer_link_steps`: session steps one Link message of a client carried
      (its sessions' decode steps merged; peer/links.py).
    * `tsotsa:peer_adapters_served` — adapters loaded (served and training).
    * `tsotsa:peer_rss_bytes`, `tsotsa:peer_uptime_seconds` — the process's resident memory, and seconds since
      it started.
    """

    def __init__(self, registry: CollectorRegistry, *, open_sessions: Callable[[], int], max_sessions: int,
                 cache_bytes_used: Callable[[], int], cache_bytes_budget: int,
                 adapters: Callable[[], Sequence[str]], started: float | None = None) -> None:
        """`started`: the process's start, as a `time.time()` value (default: psutil's record of it)."""
        import psutil

        self._process = psutil.Process()
        self._started = self._process.create_time() if started is None else started
        self._adapters = adapters

        def gauge(name: str, documentation: str, read: Callable[[], float]) -> Gauge:
            metric = Gauge(f"{PREFIX}{name}", documentation, registry=registry)
            metric.set_function(read)
            return metric

        gauge("peer_sessions_open", "Inference sessions open now.", open_sessions)
        gauge("peer_sessions_max", "Most inference sessions open at once (--max-sessions).", lambda: max_sessions)
        gauge("kv_cache_bytes_used", "KV-cache bytes the open sessions reserved.", cache_bytes_used)
        gauge("kv_cache_bytes_budget", "KV-cache budget over all sessions, in bytes (--cache-mib).",
              lambda: cache_bytes_budget)
        gauge("peer_adapters_served", "LoRA adapters loaded on this peer.", lambda: len(adapters()))
        gauge("peer_rss_bytes", "Resident memory of the peer process, in bytes.", self.rss_bytes)
        gauge("peer_uptime_seconds", "Seconds since the peer process started.", self.uptime_seconds)
        self.steps = Counter(f"{PREFIX}peer_inference_steps", "Inference-session steps computed.", registry=registry)
        self.tokens = Counter(f"{PREFIX}peer_tokens_served", "Token positions computed for inference (session "
                              "steps and Forward calls).", registry=registry)
        self.step_latency = Histogram(f"{PREFIX}peer_step_latency_seconds", "Seconds one session step takes "
                                      "inside the peer.", buckets=STEP_BUCKETS, registry=registry)
        self.forward_calls = Counter(f"{PREFIX}peer_forward_calls", "Stateless Forward calls computed.",
                                     registry=registry)
        self.batch_sessions = Histogram(f"{PREFIX}peer_batch_sessions", "Sessions whose decode steps one pass "
                                        "over the blocks computed together.", buckets=BATCH_BUCKETS,
                                        registry=registry)
        self.link_steps = Histogram(f"{PREFIX}peer_link_steps", "Session steps one Link message of a client "
                                    "carried.", buckets=BATCH_BUCKETS, registry=registry)
        self.train_micro_batches = Counter(f"{PREFIX}peer_train_micro_batches", "Training micro-batches computed.",
                                           ["phase"], registry=registry)
        for phase in ("forward", "backward"):
            self.train_micro_batches.labels(phase)

    def adapter_names(self) -> list[str]:
        return list(self._adapters())

    def rss_bytes(self) -> int:
        return self._process.memory_info().rss

    def uptime_seconds(self) -> float:
        return max(time.time() - self._started, 0.0)

    def steps_served(self) -> int:
        return int(_counter_value(self.steps))

    def tokens_served(self) -> int:
        return int(_counter_value(self.tokens))


def _counter_value(counter: Counter) -> float:
    """A counter's current total, through its public `collect()`."""
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                return sample.value
    return 0.0


class TrainingCollector(Collector):
    """The coordinator's fine-tuning runs as metrics, read at scrape time through `list_runs` (for instance
    `CoordinatorClient.runs`, or the coordinator's own store): nothing is copied, so a scrape sees the runs as
    they are. Per run:

    * `tsotsa:training_rounds_done{run}` — rounds completed.
    * `tsotsa:training_loss{run}` — the train loss of the last completed round (absent before one, or unknown).
    * `tsotsa:training_eval_loss{run}` — its eval loss (absent without an eval set).
    * `tsotsa:training_run_state{run,state}` — 1 for the run's state, 0 for every other state.

    and `tsotsa:training_runs_reachable`: 1 when `list_runs` answered, 0 when it raised (logged once per outage;
    the page is still served, so serving metrics beside it survive a coordinator restart).
    """

    def __init__(self, list_runs: Callable[[], Iterable["pb.RunInfo"]]) -> None:
        self._list_runs = list_runs
        self._failing = False

    def collect(self) -> Iterator[Metric]:
        reachable = GaugeMetricFamily(f"{PREFIX}training_runs_reachable", "1 when the runs could be listed.")
        rounds = GaugeMetricFamily(f"{PREFIX}training_rounds_done", "Rounds a run completed.", labels=["run"])
        loss = GaugeMetricFamily(f"{PREFIX}training_loss", "Train loss of a run's last completed round.",
                                 labels=["run"])
        eval_loss = GaugeMetricFamily(f"{PREFIX}training_eval_loss", "Eval loss of a run's last completed round.",
                                      labels=["run"])
        state = GaugeMetricFamily(f"{PREFIX}training_run_state", "1 for a run's state, 0 for the others.",
                                  labels=["run", "state"])
        try:
            runs = list(self._list_runs())
        except Exception as error:
            if not self._failing:
                logger.warning("cannot list the fine-tuning runs for /metrics: %s", error)
            self._failing = True
            reachable.add_metric([], 0)
            yield reachable
            return
        self._failing = False
        reachable.add_metric([], 1)
        for run in runs:
            rounds.add_metric([run.name], run.rounds_done)
            done = [r for r in run.rounds if r.state == "done"]
            last = max(done, key=lambda r: r.round) if done else None
            if last is not None and math.isfinite(last.train_loss):
                loss.add_metric([run.name], last.train_loss)
            if last is not None and math.isfinite(last.eval_loss):
                eval_loss.add_metric([run.name], last.eval_loss)
            for name in dict.fromkeys((*RUN_STATES, run.state)):  # a state a newer coordinator added shows too
                state.add_metric([run.name, name], 1 if name == run.state else 0)
        yield from (reachable, rounds, loss, eval_loss, state)
