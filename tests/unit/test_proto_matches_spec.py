"""Our csi.proto must be the upstream CSI v1.13.0 spec, definition for definition.

Only comments may differ. The upstream file lives in the Go module cache
(it is a dependency of csi-test, which scripts/build-tools downloads).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from csi_driver import redact
from csi_driver.proto import csi_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
OUR_PROTO = Path("csi_driver") / "proto" / "csi.proto"
SPEC_VERSION = "v1.13.0"
SPEC_MODULE_PATH = Path("github.com") / "container-storage-interface" / f"spec@{SPEC_VERSION}"

EXPECTED_SERVICES = {
    "csi.v1.Identity",
    "csi.v1.Controller",
    "csi.v1.GroupController",
    "csi.v1.SnapshotMetadata",
    "csi.v1.Node",
}


def _go_mod_cache() -> Path:
    go = shutil.which("go")
    if go is not None:
        result = subprocess.run(
            [go, "env", "GOMODCACHE"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0 and result.stdout.strip():
            return Path(result.stdout.strip())
    return Path.home() / "go" / "pkg" / "mod"


@pytest.fixture(scope="module")
def upstream_proto() -> Path:
    path = _go_mod_cache() / SPEC_MODULE_PATH / "csi.proto"
    if not path.is_file():
        pytest.skip(
            f"upstream CSI spec not found at {path}; scripts/build-tools downloads it "
            "(github.com/container-storage-interface/spec is a dependency of csi-test)"
        )
    return path


def _compile(include_dir: Path, proto: Path, out: Path) -> descriptor_pb2.FileDescriptorProto:
    """Compile one .proto to its FileDescriptorProto with grpc_tools.protoc."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{include_dir}",
            f"--descriptor_set_out={out}",
            str(proto),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed on {proto}:\n{result.stderr}"
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert len(fds.file) == 1
    return fds.file[0]


def _comparable(fd: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    fd.ClearField("name")
    fd.ClearField("source_code_info")
    return fd


@pytest.fixture(scope="module")
def descriptors(
    upstream_proto: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[descriptor_pb2.FileDescriptorProto, descriptor_pb2.FileDescriptorProto]:
    tmp = tmp_path_factory.mktemp("csi-descriptors")
    ours = _compile(REPO_ROOT, REPO_ROOT / OUR_PROTO, tmp / "ours.pb")
    upstream = _compile(upstream_proto.parent, upstream_proto, tmp / "upstream.pb")
    return ours, upstream


def test_proto_matches_upstream_spec(
    descriptors: tuple[descriptor_pb2.FileDescriptorProto, descriptor_pb2.FileDescriptorProto],
) -> None:
    ours, upstream = descriptors
    assert ours.name == OUR_PROTO.as_posix()
    assert upstream.name == "csi.proto"
    ours_cmp, upstream_cmp = _comparable(ours), _comparable(upstream)
    if ours_cmp != upstream_cmp:
        # Narrow the failure down to the first differing top-level definition.
        for kind in ("message_type", "enum_type", "service", "extension"):
            ours_defs = {d.name: d for d in getattr(ours_cmp, kind)}
            upstream_defs = {d.name: d for d in getattr(upstream_cmp, kind)}
            assert list(ours_defs) == list(upstream_defs), f"{kind} names/order differ"
            for name, definition in upstream_defs.items():
                assert ours_defs[name] == definition, f"{kind} {name} differs from upstream"
    assert ours_cmp == upstream_cmp, (
        f"{OUR_PROTO} differs from the upstream CSI {SPEC_VERSION} csi.proto beyond comments"
    )


def _secret_fields_of(fd: descriptor_pb2.FileDescriptorProto) -> set[str]:
    """Full names of csi_secret fields, read from a raw FileDescriptorProto."""
    found: set[str] = set()
    pending = [(f"{fd.package}.{m.name}", m) for m in fd.message_type]
    while pending:
        full_name, message = pending.pop()
        for field in message.field:
            if field.options.Extensions[csi_pb2.csi_secret]:
                found.add(f"{full_name}.{field.name}")
        pending.extend((f"{full_name}.{n.name}", n) for n in message.nested_type)
    return found


def test_secret_fields_match_upstream(
    descriptors: tuple[descriptor_pb2.FileDescriptorProto, descriptor_pb2.FileDescriptorProto],
) -> None:
    _, upstream = descriptors
    upstream_secrets = _secret_fields_of(upstream)
    ours = redact.secret_fields_in_file(csi_pb2.DESCRIPTOR)
    assert ours == upstream_secrets
    # Sanity: the walk really found the option (22 request types in v1.13.0).
    assert "csi.v1.CreateVolumeRequest.secrets" in ours
    assert "csi.v1.NodeStageVolumeRequest.secrets" in ours
    assert "csi.v1.CreateSnapshotRequest.secrets" in ours
    assert len(ours) == 22


def test_package_and_services() -> None:
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    assert csi_pb2.DESCRIPTOR.name == OUR_PROTO.as_posix()
    services = {s.full_name for s in csi_pb2.DESCRIPTOR.services_by_name.values()}
    assert services == EXPECTED_SERVICES


def test_every_secret_field_is_a_string_map() -> None:
    # redact.py handles any field shape, but CSI only ever marks map<string,
    # string> "secrets" fields; a change here means the spec moved.
    for full_name in redact.secret_fields_in_file(csi_pb2.DESCRIPTOR):
        message_name, _, field_name = full_name.removeprefix("csi.v1.").rpartition(".")
        assert field_name == "secrets", full_name
        descriptor = csi_pb2.DESCRIPTOR.message_types_by_name[message_name]
        entry = descriptor.fields_by_name[field_name].message_type
        assert entry is not None, full_name
        assert entry.GetOptions().map_entry, full_name
