"""A whole swarm on loopback: a coordinator and peers as real processes, for tests, benchmarks and the demo.

Each process runs in its own process group (its DHT child and p2p daemon with it). `stop()` sends SIGTERM
to the process, so it drains and leaves the DHT as in production, then SIGKILLs the group: nothing it
started survives.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tsotsa.errors import SwarmError
from tsotsa.tls import TlsSettings

# `python -m` rather than the console scripts: works wherever the package imports, installed or not.
COORDINATOR_COMMAND = [sys.executable, "-m", "tsotsa.coordinator"]
PEER_COMMAND = [sys.executable, "-m", "tsotsa.peer"]
COORDINATOR_READY = re.compile(r"coordinator of (\S+) .* at (\S+); DHT (.+)$")
HTTP_READY = re.compile(r"HTTP API at (https?://\S+)/v1")
PEER_READY = re.compile(r"serving blocks (\d+):(\d+) of (\S+) at (\S+) as (\S+) .*; DHT (.+)$")


class ManagedProcess:
    """A child process whose output is collected, started in its own session, stopped by PID."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name, self.argv = name, argv
        self.lines: list[str] = []
        self._output_closed = False
        self._new_line = threading.Condition()
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "HIVEMIND_LOGLEVEL": "ERROR", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env or {})},
        )
        threading.Thread(target=self._collect, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _collect(self) -> None:
        for line in self.process.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._output_closed = True
            self._new_line.notify_all()

    def wait_for(self, pattern: re.Pattern, timeout: float = 120.0) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines:
                    match = pattern.search(line)
                    if match:
                        return match
                if self._output_closed:
                    self.process.wait()
                    raise SwarmError(f"{self.name} exited with {self.process.returncode}:\n" + self.output())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SwarmError(f"{self.name} not ready after {timeout:.0f} s:\n" + self.output())
                self._new_line.wait(min(remaining, 0.5))

    def _alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (a peer drains), then SIGKILL whatever is left of its process group."""
        if self._alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.process.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class LocalPeer:
    process: ManagedProcess
    start: int
    end: int
    address: str
    peer_id: str
    dht_addresses: list[str]


@dataclass
class LocalSwarm:
    model_dir: Path | None  # None: peers fetch their blocks (local_model=False), the coordinator is elsewhere
    cache_dir: Path | None = None
    threads: int = 1
    token: str | None = None  # given to every process as TSOTSA_TOKEN (not on the command line: ps shows that)
    admin_token: str | None = None  # given to the coordinator as TSOTSA_ADMIN_TOKEN
    tls: TlsSettings | None = None  # every process's TLS files, as TSOTSA_TLS_*: the whole swarm speaks mutual TLS
    state_dir: Path | None = None  # the coordinator's (runs, SQLite, DHT identity); default: a fresh temp dir
    http: bool = False  # the coordinator also serves the HTTP API (--http-port 0); its base URL in `http_url`
    coordinator_address: str = ""
    http_url: str = ""
    model_id: str = ""
    initial_peers: list[str] = field(default_factory=list)
    peers: list[LocalPeer] = field(default_factory=list)
    coordinator: ManagedProcess | None = None
    _starting: list[ManagedProcess] = field(default_factory=list)
    _state_dirs: list[str] = field(default_factory=list)  # made by this swarm; removed by stop()

    def start_coordinator(self) -> str:
        """Starts the coordinator; after `kill_coordinator`, a new one on the same ports and state. With
        `coordinator_address` set beforehand, it listens there."""
        if self.state_dir is None:
            self.state_dir = Path(self._scratch("coordinator"))
        port, dht_port = "0", "0"
        if self.coordinator_address:  # a restart, or a port chosen in advance (peers may be started first)
            port = self.coordinator_address.rsplit(":", 1)[1]
        if self.initial_peers:
            dht_port = re.search(r"/tcp/(\d+)/", self.initial_peers[0]).group(1)
        env = {**self._env(), **({"TSOTSA_ADMIN_TOKEN": self.admin_token} if self.admin_token else {})}
        self.coordinator = ManagedProcess("coordinator", [
            *COORDINATOR_COMMAND, "up", "--model", str(self.model_dir), "--port", port, "--dht-port", dht_port,
            "--state-dir", str(self.state_dir), *(["--http-port", "0"] if self.http else [])], env)
        match = self.coordinator.wait_for(COORDINATOR_READY)
        self.model_id, self.coordinator_address = match.group(1), match.group(2)
        self.initial_peers = match.group(3).split()
        if self.http:
            self.http_url = self.coordinator.wait_for(HTTP_READY).group(1)
        return self.coordinator_address

    def kill_coordinator(self) -> None:
        """SIGKILL, as a crash or a pulled plug would: no clean shutdown."""
        self.coordinator.kill()
        self.coordinator = None

    def add_peers(self, spans: list[str | None], *args: str, local_model: bool = True,
                  command: list[str] = PEER_COMMAND) -> list[LocalPeer]:
        """Starts one peer per span (None: the peer picks), all at once, and waits until all serve."""
        return self.wait_for_peers([self.start_peer(blocks, *args, local_model=local_model, command=command)
                                    for blocks in spans])

    def start_peer(self, blocks: str | None, *args: str, local_model: bool = True,
                   command: list[str] = PEER_COMMAND) -> ManagedProcess:
        """Starts a peer without waiting for it (see `wait_for_peers`); `stop()` stops it in any case.

        local_model=False: the peer has no checkpoint and fetches its blocks from the coordinator.
        `command`: what runs `tsotsa-peer` (a test's misbehaving peer wraps the real one).
        """
        argv = [*command, "join", "--coordinator", self.coordinator_address,
                "--threads", str(self.threads), "--port", "0"]
        if blocks:
            argv += ["--blocks", blocks]
        if local_model:
            argv += ["--model", str(self.model_dir)]
        if self.cache_dir is not None:
            argv += ["--cache-dir", str(self.cache_dir)]
        if "--state-dir" not in args:  # peers on one machine each need their own DHT identity
            argv += ["--state-dir", self._scratch(f"peer-{len(self._state_dirs)}")]
        process = ManagedProcess(f"peer {blocks or '(auto)'}", [*argv, *args], self._env())
        self._starting.append(process)
        return process

    def _env(self) -> dict[str, str]:
        return {**({"TSOTSA_TOKEN": self.token} if self.token else {}), **(self.tls.env() if self.tls else {})}

    def wait_for_peers(self, processes: list[ManagedProcess]) -> list[LocalPeer]:
        started = []
        for process in processes:
            match = process.wait_for(PEER_READY)
            started.append(LocalPeer(process, int(match.group(1)), int(match.group(2)), match.group(4),
                                     match.group(5), match.group(6).split()))
        for peer in started:
            self._starting.remove(peer.process)
        self.peers.extend(started)
        return started

    def kill_peer(self, peer: LocalPeer) -> None:
        """SIGKILL: the peer vanishes without draining, as a crashed machine does."""
        self.peers.remove(peer)
        peer.process.kill()

    def stop_peer(self, peer: LocalPeer) -> int | None:
        self.peers.remove(peer)
        return peer.process.terminate()

    def stop(self) -> None:
        """Stops every peer (in parallel: each drains on its own) and then the coordinator."""
        for process in self._starting:
            process.kill()
        self._starting.clear()
        stoppers = [threading.Thread(target=self.stop_peer, args=(peer,)) for peer in list(self.peers)]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        if self.coordinator is not None:
            self.coordinator.terminate()
            self.coordinator = None
        for directory in self._state_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._state_dirs.clear()

    def _scratch(self, name: str) -> str:
        """A fresh state directory of this swarm's, removed when it stops."""
        directory = tempfile.mkdtemp(prefix=f"tsotsa-{name}-")
        self._state_dirs.append(directory)
        return directory

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
