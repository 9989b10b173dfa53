"""The live dashboard: one self-contained page at `/`, the state it draws at `/api/state`, and a stream of that
state at `/api/events`.

Why it looks like this:

* The page is a static file (`dashboard.html`, inline CSS and JS, no CDN): lab machines are often offline,
  and nothing of the swarm's data is templated into HTML, so records an open swarm's peers write (addresses,
  device names, adapter names) can only ever reach the page as text, never as markup.
* The state merges the coordinator's swarm map (what the DHT says) with each peer's own `Info` answer (what
  the peer says now): a record outlives a crashed peer by up to its ttl, so a peer that does not answer is
  shown as unreachable and does not count as covering its blocks. Without the coordinator the map comes
  from this client's own DHT view (inference does not need the coordinator either).
* Gathering is blocking gRPC, so it runs on a worker thread; `Info` calls go out at once as gRPC futures
  (no thread per peer) under one short timeout. Several open pages share one gathering (`StateSource`), so
  ten browser tabs do not ask every peer ten times.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import TYPE_CHECKING

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tsotsa.errors import TsotsaError
from tsotsa.records import ServerState
from tsotsa.v1 import tsotsa_pb2 as pb

if TYPE_CHECKING:
    from tsotsa.api.engine import Engine
    from tsotsa.client.swarm import Swarm
    from tsotsa.coordinator_client import CoordinatorClient

logger = logging.getLogger(__name__)

EVENT_INTERVAL = 2.0     # seconds between two states sent on /api/events
INFO_TIMEOUT = 2.0       # seconds a peer has to answer Info before it is shown as unreachable
STATUS_TIMEOUT = 10.0    # seconds for the coordinator's SwarmStatus (a DHT survey) and ListRuns
STATE_MAX_AGE = 1.0      # a gathered state is reused this long by every page asking
DISCONNECT_POLL = 0.5    # how often a waiting event stream checks whether its client left

# PeerInfo fields passed to the page as they are (0 / empty where an older peer does not send them).
INFO_FIELDS = ("open_sessions", "max_sessions", "cache_bytes_used", "cache_bytes_limit", "rss_bytes",
               "uptime_seconds", "tokens_served", "steps_served", "parameter_bytes_held")


def dashboard_router(engine: Engine, coordinator_client: Callable[[], CoordinatorClient]) -> APIRouter:
    """`engine`: the API's `tsotsa.api.engine.Engine` (its swarm client and served name);
    `coordinator_client()`: a new `CoordinatorClient` (the caller closes it)."""
    router = APIRouter()
    source = StateSource(lambda: gather_state(engine, coordinator_client))

    @router.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(dashboard_page(), headers={"Cache-Control": "no-cache"})

    @router.get("/api/state")
    async def state() -> JSONResponse:
        return JSONResponse(await source.get(), headers={"Cache-Control": "no-store"})

    @router.get("/api/events")
    async def events(request: Request) -> StreamingResponse:
        return StreamingResponse(state_events(request, source), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


def dashboard_page() -> str:
    return resources.files("tsotsa.api").joinpath("dashboard.html").read_text(encoding="utf-8")


def login_page() -> str:
    """What a browser gets (401) from a swarm with a token when it has no `tsotsa_key` cookie: one field
    for the token, stored percent-encoded as that cookie (path /, SameSite=Strict) before the page reloads."""
    return _LOGIN_PAGE


async def state_events(request: Request, source: "StateSource") -> AsyncIterator[str]:
    """`data: <state>` every EVENT_INTERVAL seconds until the client disconnects (also cancelled by the
    response when it does; nothing here outlives the request but a gathering other pages share)."""
    while not await request.is_disconnected():
        try:
            state = await source.get()
        except Exception as error:  # a bug in gathering: the page says so and the stream goes on
            logger.exception("gathering the dashboard's state failed")
            state = {"error": f"internal error: {type(error).__name__}"}
        yield f"data: {json.dumps(state, separators=(',', ':'), allow_nan=False)}\n\n"
        waited = 0.0
        while waited < EVENT_INTERVAL:
            await asyncio.sleep(min(DISCONNECT_POLL, EVENT_INTERVAL - waited))
            waited += DISCONNECT_POLL
            if await request.is_disconnected():
                return


class StateSource:
    """One gathering at a time on a worker thread, its result reused for STATE_MAX_AGE seconds by every
    caller. A caller that goes away (a closed page) does not cancel a gathering others wait for."""

    def __init__(self, gather: Callable[[], dict], max_age: float = STATE_MAX_AGE) -> None:
        self._gather, self._max_age = gather, max_age
        self._state: dict | None = None
        self._at = -math.inf
        self._pending: asyncio.Future | None = None

    async def get(self) -> dict:
        if self._state is not None and time.monotonic() - self._at < self._max_age:
            return self._state
        loop = asyncio.get_running_loop()
        if self._pending is None or self._pending.get_loop() is not loop:
            self._pending = asyncio.ensure_future(run_in_threadpool(self._gather))
            self._pending.add_done_callback(self._store)
        return await asyncio.shield(self._pending)

    def _store(self, future: asyncio.Future) -> None:
        if self._pending is future:
            self._pending = None
        if not future.cancelled() and future.exception() is None:
            self._state, self._at = future.result(), time.monotonic()


# ---------------------------------------------------------------------- gathering (blocking: worker thread)

def gather_state(engine: Engine, coordinator_client: Callable[[], CoordinatorClient]) -> dict:
    """Everything the page shows, as plain JSON types (no NaN: unknown numbers are null)."""
    model = engine.model
    num_blocks = int(model.config.num_hidden_layers)
    state: dict = {"model_id": model.model_id, "served_name": engine.base_name, "num_blocks": num_blocks,
                   "updated_at": time.time(), "coordinator_error": None, "map_source": "coordinator",
                   "rejected_records": 0, "reported": [], "runs": []}
    records: list[dict] | None = None
    try:
        with coordinator_client() as client:
            client.timeout = min(client.timeout, STATUS_TIMEOUT)
            swarm_map = client.swarm_status()
            records = [_record_json(peer) for peer in swarm_map.peers]
            state["rejected_records"] = int(swarm_map.rejected_records)
            state["reported"] = [{"peer_id": r.peer_id, "reports": int(r.reports), "last_reason": r.last_reason,
                                  "seconds_ago": _finite(r.seconds_ago)} for r in swarm_map.reported]
            state["runs"] = [run_json(run) for run in client.runs()]
    except TsotsaError as error:
        state["coordinator_error"] = str(error)
        if records is None:  # no map from the coordinator: the one of this client's own DHT view
            state["map_source"] = "dht"
            records = _records_from_dht(model.swarm)
    state["peers"] = with_peer_info(records, model.swarm, model.model_id)
    state["blocks"] = coverage(state["peers"], num_blocks)
    state["gaps"] = [block["block"] for block in state["blocks"] if block["gap"]]
    return state


def _record_json(peer: pb.PeerRecord) -> dict:
    return {"peer_id": peer.peer_id, "address": peer.address, "start": int(peer.start_block),
            "end": int(peer.end_block), "record_state": peer.state, "throughput": _finite(peer.throughput),
            "device": peer.device, "dtype": peer.dtype, "quant": peer.quant, "expires_in": _finite(peer.expires_in)}


def _records_from_dht(swarm: Swarm) -> list[dict]:
    try:
        servers = swarm.servers()
    except TsotsaError as error:
        logger.warning("no swarm map from the DHT either: %s", error)
        return []
    now = time.time()  # hivemind's DHT time is wall-clock time
    return [{"peer_id": s.peer_id, "address": s.address, "start": s.start, "end": s.end,
             "record_state": s.state.value, "throughput": _finite(s.throughput), "device": s.device,
             "dtype": s.dtype, "quant": s.quant, "expires_in": _finite(max(0.0, s.expires_at - now))}
            for s in sorted(servers, key=lambda s: (s.start, s.end, s.peer_id))]


def with_peer_info(records: list[dict], swarm: Swarm, model_id: str, timeout: float = INFO_TIMEOUT) -> list[dict]:
    """Each record with its peer's `Info` answer, asked of every peer at once. `reachable`: True (answered as
    its record says), False (no answer, or the answer of another peer or model), None (no address yet).
    `state` is the peer's own word when it answered, else its record's."""
    calls = {}
    for index, record in enumerate(records):
        if record["address"]:
            try:
                calls[index] = swarm.stub(record["address"]).Info.future(pb.InfoRequest(), timeout=timeout)
            except (grpc.RpcError, ValueError) as error:  # an address gRPC cannot even parse
                calls[index] = str(error)[:200] or type(error).__name__
    peers = []
    for index, record in enumerate(records):
        peer = {**record, "state": record["record_state"], "reachable": None, "error": None, "adapters": [],
                **{name: None for name in INFO_FIELDS}}
        call = calls.get(index)
        if call is not None:
            info, error = _answer(call)
            if info is not None and (info.peer_id != record["peer_id"] or info.model_id != model_id):
                info, error = None, f"another peer or model answers at {record['address']}"
            peer["reachable"], peer["error"] = info is not None, error
            if info is not None:
                peer["state"] = info.state or record["record_state"]
                peer["adapters"] = list(getattr(info, "adapters", ()))
                peer.update({name: _finite(getattr(info, name, 0)) for name in INFO_FIELDS})
        peers.append(peer)
    return peers


def _answer(call) -> tuple[pb.PeerInfo | None, str | None]:
    """(Info, None) or (None, why); `call` is the gRPC future, or the message of a call that never started
    (a gRPC future is itself an RpcError, so the two cannot be told apart by type)."""
    if isinstance(call, str):
        return None, call
    try:
        return call.result(), None
    except (grpc.FutureCancelledError, grpc.FutureTimeoutError) as error:
        return None, type(error).__name__
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else ""
        return None, f"{code.name if code else 'error'}: {details or ''}"[:200]


def coverage(peers: list[dict], num_blocks: int) -> list[dict]:
    """Per block, the peers serving it by state; a gap is a block no reachable online peer serves."""
    blocks = []
    for index in range(num_blocks):
        serving = [p for p in peers if p["start"] <= index < p["end"]]
        online = [p["peer_id"] for p in serving if p["state"] == ServerState.ONLINE.value and p["reachable"] is not False]
        blocks.append({"block": index, "online": online,
                       "joining": [p["peer_id"] for p in serving if p["state"] == ServerState.JOINING.value],
                       "draining": [p["peer_id"] for p in serving if p["state"] == ServerState.DRAINING.value],
                       "unreachable": [p["peer_id"] for p in serving if p["reachable"] is False],
                       "throughput": sum(p["throughput"] or 0.0 for p in serving if p["peer_id"] in online),
                       "gap": not online})
    return blocks


def run_json(run: pb.RunInfo) -> dict:
    """A run as the page draws it: progress (rounds done of the configured total) and each round's losses
    (NaN — unknown, or no eval set — becomes null)."""
    try:
        config = json.loads(run.config_json) if run.config_json else {}
    except ValueError:
        config = {}
    if not isinstance(config, dict):
        config = {}
    total = config.get("rounds")
    steps = config.get("steps_per_round")
    return {"name": run.name, "state": run.state, "message": run.message, "rounds_done": int(run.rounds_done),
            "rounds_total": total if isinstance(total, int) else None,
            "steps_per_round": steps if isinstance(steps, int) else None,
            "rounds": [{"round": int(r.round), "state": r.state, "train_loss": _finite(r.train_loss),
                        "eval_loss": _finite(r.eval_loss), "samples": int(r.samples), "tokens": int(r.tokens),
                        "tokens_per_s": _finite(r.tokens_per_s)} for r in run.rounds]}


def _finite(value) -> float | int | None:
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>tsotsa: swarm token</title>
<style>
body{font:15px/1.4 system-ui,sans-serif;background:#f4f5f7;color:#1d2330;display:flex;min-height:90vh;
align-items:center;justify-content:center;margin:0}
form{background:#fff;padding:1.6em 2em;border-radius:8px;box-shadow:0 1px 4px #0002;max-width:26em}
h1{font-size:1.2em;margin:0 0 .6em}input{font:inherit;width:100%;box-sizing:border-box;padding:.45em;margin:.6em 0}
button{font:inherit;padding:.4em 1.2em}#login-message{color:#b3261e;min-height:1.4em}
</style></head><body>
<form id="login-form" autocomplete="off">
<h1>tsotsa dashboard</h1>
<label for="token">This swarm has a token. Enter it once; this browser keeps it as a cookie.</label>
<input id="token" name="token" type="password" autofocus required>
<button id="login" type="submit">Open the dashboard</button>
<p id="login-message"></p>
</form>
<script>
"use strict";
// The cookie carries the token percent-encoded (any character survives); the server decodes it.
const message = document.getElementById("login-message");
if (document.cookie.split("; ").some(c => c.startsWith("tsotsa_key="))) {
  message.textContent = "That token was not accepted.";
}
document.getElementById("login-form").addEventListener("submit", event => {
  event.preventDefault();
  const token = document.getElementById("token").value.trim();
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = "tsotsa_key=" + encodeURIComponent(token) + "; path=/; SameSite=Strict; max-age=31536000" + secure;
  location.reload();
});
</script>
</body></html>
"""
