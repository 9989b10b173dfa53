"""The committed gRPC/protobuf stubs are what `make protos` generates from protos/ today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["tsotsa_pb2.py", "tsotsa_pb2.pyi", "tsotsa_pb2_grpc.py"]


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    source = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", source, ignore=shutil.ignore_patterns(*GENERATED, "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{source}", f"--python_out={source}", f"--pyi_out={source}",
         f"--grpc_python_out={source}", str(source / "tsotsa/v1/tsotsa.proto")],
        check=True,
    )
    for name in GENERATED:
        fresh = (source / "tsotsa/v1" / name).read_text()
        committed = (ROOT / "protos/tsotsa/v1" / name).read_text()
        assert fresh == committed, f"protos/tsotsa/v1/{name} is stale: run `make protos`"
