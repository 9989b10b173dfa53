"""The swarm map as people and scripts read it: per block, who serves it, in what state, how fast."""

from __future__ import annotations

from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from tsotsa.records import ServerState
from tsotsa.v1 import tsotsa_pb2 as pb


def swarm_map_json(swarm_map: pb.SwarmMap) -> dict:
    peers = [MessageToDict(p, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
             for p in swarm_map.peers]
    blocks = [
        {"block": index,
         "peers": [p.peer_id for p in swarm_map.peers if p.start_block <= index < p.end_block],
         "online_throughput": sum(p.throughput for p in swarm_map.peers
                                  if p.start_block <= index < p.end_block and p.state == ServerState.ONLINE)}
        for index in range(swarm_map.num_blocks)
    ]
    reported = [MessageToDict(p, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                for p in swarm_map.reported]
    return {"model_id": swarm_map.model_id, "num_blocks": swarm_map.num_blocks, "peers": peers, "blocks": blocks,
            "rejected_records": swarm_map.rejected_records, "reported": reported}


def print_swarm_map(swarm_map: pb.SwarmMap, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{swarm_map.model_id}: {swarm_map.num_blocks} blocks, {len(swarm_map.peers)} peers")
    table.add_column("blocks")
    for index in range(swarm_map.num_blocks):
        table.add_column(str(index), justify="center")
    table.add_column("peer")
    table.add_column("address")
    table.add_column("state")
    table.add_column("tok/s", justify="right")
    table.add_column("dtype/quant")
    for peer in swarm_map.peers:
        cells = ["█" if peer.start_block <= i < peer.end_block else "·" for i in range(swarm_map.num_blocks)]
        table.add_row(f"{peer.start_block}:{peer.end_block}", *cells, peer.peer_id[:14], peer.address, peer.state,
                      f"{peer.throughput:.1f}", f"{peer.dtype}/{peer.quant} {peer.device}")
    uncovered = [i for i in range(swarm_map.num_blocks)
                 if not any(p.start_block <= i < p.end_block and p.state == ServerState.ONLINE for p in swarm_map.peers)]
    console.print(table)
    if uncovered:
        console.print(f"[red]blocks with no online peer: {', '.join(map(str, uncovered))}[/red]")
    else:
        console.print("[green]every block is served[/green]")
    for reported in swarm_map.reported:
        console.print(f"[red]peer {reported.peer_id} reported {reported.reports}x for wrong answers, last "
                      f"{reported.seconds_ago:.0f} s ago: {reported.last_reason}[/red]", soft_wrap=True)
    if swarm_map.rejected_records:
        console.print(f"[yellow]{swarm_map.rejected_records} invalid records in the DHT were ignored[/yellow]")
