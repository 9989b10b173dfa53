"""The coordinator's memory of the swarm's DHT addresses (coordinator/rejoin.py) under concurrent lookups:
every thread that looks the swarm up saves, and a save must never fail the lookup (a training run once
failed because two threads replaced the same partial file)."""

from __future__ import annotations

import threading

from tsotsa.coordinator.rejoin import PeerMemory
from tsotsa.records import ServerRecord, ServerState

PEER = "/ip4/127.0.0.1/tcp/{port}/p2p/QmXoUP21wNHg5wnPbfADQjGAKxzJpJ8r8wiKSc6rTfHdSf"


def record(port: int) -> ServerRecord:
    return ServerRecord(peer_id="p", address="127.0.0.1:1", start=0, end=1, state=ServerState.ONLINE,
                        throughput=1.0, dht_addresses=[PEER.format(port=port)])


def test_concurrent_saves_never_fail_and_leave_one_whole_file(tmp_path):
    memory = PeerMemory(tmp_path / "known-peers.txt")
    errors: list[BaseException] = []

    def saver(offset: int) -> None:
        try:
            for i in range(200):  # every save differs from the last: each one writes
                memory.save([record(20000 + offset * 1000 + i)])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=saver, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    remembered = PeerMemory(tmp_path / "known-peers.txt").load()
    assert len(remembered) == 1 and remembered[0].startswith("/ip4/127.0.0.1/tcp/")


def test_a_save_that_cannot_write_costs_a_warning_not_the_lookup(tmp_path, caplog):
    memory = PeerMemory(tmp_path / "gone" / "known-peers.txt")  # its directory does not exist
    memory.save([record(20001)])
    assert "cannot save the swarm's DHT addresses" in caplog.text
