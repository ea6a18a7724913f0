"""The committed protocol bindings must be exactly what scripts/gen-protos produces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GEN_PROTOS = REPO_ROOT / "scripts" / "gen-protos"
PROTOS = (Path("csi_driver/proto/csi.proto"), Path("csi_driver/proto/pluginregistration.proto"),
          Path("replication_agent/proto/agent.proto"))
GENERATED = tuple(
    proto.parent / f"{proto.stem}{suffix}"
    for proto in PROTOS
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
)


@pytest.fixture(scope="module")
def fresh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen-protos")
    # Use the interpreter running the tests: it has grpcio-tools installed,
    # and the mypy-protobuf plugins live next to it in the venv.
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(GEN_PROTOS), str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (
        f"scripts/gen-protos failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return out


def test_gen_protos_is_executable() -> None:
    assert os.access(GEN_PROTOS, os.X_OK), f"{GEN_PROTOS} must be executable"


@pytest.mark.parametrize("name", GENERATED, ids=str)
def test_committed_stub_is_up_to_date(fresh_dir: Path, name: Path) -> None:
    committed = REPO_ROOT / name
    fresh = fresh_dir / name
    assert fresh.is_file(), f"scripts/gen-protos did not produce {name}"
    assert committed.is_file(), f"{name} is missing; run scripts/gen-protos and commit the result"
    assert committed.read_bytes() == fresh.read_bytes(), (
        f"{name} is out of date with its .proto (or was "
        "generated with different grpcio-tools/mypy-protobuf versions); "
        "run scripts/gen-protos and commit the result"
    )
