"""A client process for tests: joins the swarm, waits at a gate (a file the test creates once every client
is ready), sleeps its stagger, then generates greedily and prints one JSON line.

    python tests/gated_client.py COORDINATOR GATE_FILE STAGGER_S MAX_NEW_TOKENS CACHE_DIR PROMPT

Separate processes, each with its own `SwarmModel`, are independent clients as far as the peers can tell;
the gate only keeps their start-up times (seconds of imports on a busy machine) from spreading them so far
apart that their generations never overlap.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

GATE_TIMEOUT = 180.0


def main() -> int:
    coordinator, gate, stagger, new_tokens, cache_dir, prompt = sys.argv[1:7]
    from tsotsa.client.model import SwarmModel

    with SwarmModel.from_coordinator(coordinator, cache_dir=Path(cache_dir)) as model:
        ids = model.tokenizer(prompt, return_tensors="pt").input_ids
        print("ready", flush=True)
        deadline = time.monotonic() + GATE_TIMEOUT
        while not Path(gate).exists():
            if time.monotonic() > deadline:
                print("the gate never opened", file=sys.stderr)
                return 1
            time.sleep(0.01)
        time.sleep(float(stagger))
        output = model.generate(ids, max_new_tokens=int(new_tokens))
    print(json.dumps({"prompt_ids": ids[0].tolist(), "output_ids": output[0, ids.shape[1]:].tolist()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
