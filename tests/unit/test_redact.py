"""csi_driver.redact: secrets never reach log output, everything else does."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message

from csi_driver import redact
from csi_driver.proto import csi_pb2

SECRET_VALUES = ("hunter2", "s3cr3t-token", "AKIAEXAMPLEKEY")


def _secrets() -> dict[str, str]:
    return {"password": SECRET_VALUES[0], "token": SECRET_VALUES[1], "key": SECRET_VALUES[2]}


def _mount_capability() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4", mount_flags=["noatime"]),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER
        ),
    )


def _create_volume() -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name="pvc-1234",
        capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 30),
        volume_capabilities=[_mount_capability()],
        parameters={"replicas": "3"},
        secrets=_secrets(),
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="snap-1")
        ),
        mutable_parameters={"iops": "100"},
    )


def _node_stage() -> csi_pb2.NodeStageVolumeRequest:
    return csi_pb2.NodeStageVolumeRequest(
        volume_id="vol-1",
        publish_context={"device": "/dev/loop7"},
        staging_target_path="/var/lib/kubelet/plugins/staging/vol-1",
        volume_capability=_mount_capability(),
        secrets=_secrets(),
        volume_context={"pool": "fast"},
    )


def _create_snapshot() -> csi_pb2.CreateSnapshotRequest:
    return csi_pb2.CreateSnapshotRequest(
        source_volume_id="vol-1",
        name="snapshot-abc",
        secrets=_secrets(),
        parameters={"consistency": "crash"},
    )


REQUESTS = [
    pytest.param(_create_volume, id="CreateVolumeRequest"),
    pytest.param(_node_stage, id="NodeStageVolumeRequest"),
    pytest.param(_create_snapshot, id="CreateSnapshotRequest"),
]


def _assert_no_secret_in(text: str) -> None:
    for value in SECRET_VALUES:
        assert value not in text


@pytest.mark.parametrize("make", REQUESTS)
def test_redacted_strips_secrets_everywhere(make: Callable[[], Message]) -> None:
    original = make()
    clean = redact.redacted(original)
    assert type(clean) is type(original)
    _assert_no_secret_in(str(clean))
    _assert_no_secret_in(repr(clean))
    _assert_no_secret_in(clean.SerializeToString().decode("utf-8", errors="replace"))
    _assert_no_secret_in(json.dumps(redact.to_log_dict(original)))


@pytest.mark.parametrize("make", REQUESTS)
def test_original_is_untouched(make: Callable[[], Message]) -> None:
    original = make()
    before = original.SerializeToString(deterministic=True)
    redact.redacted(original)
    redact.to_log_dict(original)
    assert original.SerializeToString(deterministic=True) == before


def test_create_volume_log_dict_keeps_other_fields() -> None:
    logged = redact.to_log_dict(_create_volume())
    assert logged == {
        "name": "pvc-1234",
        "capacity_range": {"required_bytes": str(1 << 30)},
        "volume_capabilities": [
            {
                "mount": {"fs_type": "ext4", "mount_flags": ["noatime"]},
                "access_mode": {"mode": "MULTI_NODE_MULTI_WRITER"},
            }
        ],
        "parameters": {"replicas": "3"},
        "secrets": {
            "password": redact.REDACTED,
            "token": redact.REDACTED,
            "key": redact.REDACTED,
        },
        "volume_content_source": {"snapshot": {"snapshot_id": "snap-1"}},
        "mutable_parameters": {"iops": "100"},
    }


def test_node_stage_redacted_keeps_other_fields() -> None:
    original = _node_stage()
    clean = redact.redacted(original)
    assert dict(clean.secrets) == dict.fromkeys(original.secrets, redact.REDACTED)
    clean.ClearField("secrets")
    expected = _node_stage()
    expected.ClearField("secrets")
    assert clean == expected
    logged = redact.to_log_dict(original)
    assert logged["staging_target_path"] == "/var/lib/kubelet/plugins/staging/vol-1"
    assert logged["publish_context"] == {"device": "/dev/loop7"}
    assert logged["volume_context"] == {"pool": "fast"}


def test_create_snapshot_log_dict() -> None:
    logged = redact.to_log_dict(_create_snapshot())
    assert logged == {
        "source_volume_id": "vol-1",
        "name": "snapshot-abc",
        "secrets": dict.fromkeys(("password", "token", "key"), redact.REDACTED),
        "parameters": {"consistency": "crash"},
    }


def test_message_without_secrets_is_unchanged() -> None:
    response = csi_pb2.CreateVolumeResponse(
        volume=csi_pb2.Volume(volume_id="vol-1", capacity_bytes=42, volume_context={"a": "b"})
    )
    assert redact.redacted(response) == response
    assert redact.to_log_dict(response) == {
        "volume": {"volume_id": "vol-1", "capacity_bytes": "42", "volume_context": {"a": "b"}}
    }


def test_empty_secrets_stay_empty() -> None:
    request = csi_pb2.DeleteVolumeRequest(volume_id="vol-1")
    assert redact.to_log_dict(request) == {"volume_id": "vol-1"}


def test_secret_field_names() -> None:
    assert redact.secret_field_names(csi_pb2.CreateVolumeRequest.DESCRIPTOR) == {"secrets"}
    assert redact.secret_field_names(csi_pb2.NodeUnstageVolumeRequest.DESCRIPTOR) == set()
    secrets = csi_pb2.NodeExpandVolumeRequest.DESCRIPTOR.fields_by_name["secrets"]
    assert redact.is_secret(secrets)
    volume_id = csi_pb2.NodeExpandVolumeRequest.DESCRIPTOR.fields_by_name["volume_id"]
    assert not redact.is_secret(volume_id)


# CSI itself only marks top-level map<string, string> fields as secret. To
# check that redaction also reaches secrets nested in sub-messages, repeated
# messages and map values, and handles other field shapes, register a small
# test-only schema that uses the same (csi.v1.csi_secret) option.
_NESTED_SCHEMA = """
name: "tests/unit/redact_nested_test.proto"
package: "sharedsync.test.redact"
dependency: "csi_driver/proto/csi.proto"
syntax: "proto3"
message_type {
  name: "Inner"
  field {
    name: "token" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING
    options { [csi.v1.csi_secret]: true }
  }
  field {
    name: "blob" number: 2 label: LABEL_OPTIONAL type: TYPE_BYTES
    options { [csi.v1.csi_secret]: true }
  }
  field {
    name: "keys" number: 3 label: LABEL_REPEATED type: TYPE_STRING
    options { [csi.v1.csi_secret]: true }
  }
  field {
    name: "pin" number: 4 label: LABEL_OPTIONAL type: TYPE_INT64
    options { [csi.v1.csi_secret]: true }
  }
  field { name: "visible" number: 5 label: LABEL_OPTIONAL type: TYPE_STRING }
}
message_type {
  name: "Outer"
  field {
    name: "inner" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE
    type_name: ".sharedsync.test.redact.Inner"
  }
  field {
    name: "many" number: 2 label: LABEL_REPEATED type: TYPE_MESSAGE
    type_name: ".sharedsync.test.redact.Inner"
  }
  field {
    name: "by_name" number: 3 label: LABEL_REPEATED type: TYPE_MESSAGE
    type_name: ".sharedsync.test.redact.Outer.ByNameEntry"
  }
  field {
    name: "hidden" number: 4 label: LABEL_OPTIONAL type: TYPE_MESSAGE
    type_name: ".sharedsync.test.redact.Inner"
    options { [csi.v1.csi_secret]: true }
  }
  field {
    name: "wrapped" number: 5 label: LABEL_OPTIONAL type: TYPE_MESSAGE
    type_name: ".csi.v1.CreateVolumeRequest"
  }
  field {
    name: "blobs" number: 6 label: LABEL_REPEATED type: TYPE_MESSAGE
    type_name: ".sharedsync.test.redact.Outer.BlobsEntry"
    options { [csi.v1.csi_secret]: true }
  }
  nested_type {
    name: "ByNameEntry"
    options { map_entry: true }
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field {
      name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
      type_name: ".sharedsync.test.redact.Inner"
    }
  }
  nested_type {
    name: "BlobsEntry"
    options { map_entry: true }
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_BYTES }
  }
}
"""

_INNER = 'token: "hunter2" blob: "s3cr3t-token" keys: ["AKIAEXAMPLEKEY"] pin: 1234 visible: "ok"'


@pytest.fixture(scope="module")
def outer_class() -> type[Message]:
    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindMessageTypeByName("sharedsync.test.redact.Outer")
    except KeyError:
        schema = text_format.Parse(_NESTED_SCHEMA, descriptor_pb2.FileDescriptorProto())
        pool.AddSerializedFile(schema.SerializeToString())
        descriptor = pool.FindMessageTypeByName("sharedsync.test.redact.Outer")
    return message_factory.GetMessageClass(descriptor)


def test_nested_secrets_are_redacted(outer_class: type[Message]) -> None:
    original = text_format.Parse(
        f"""
        inner {{ {_INNER} }}
        many {{ {_INNER} }}
        many {{ visible: "second" }}
        by_name {{ key: "a" value {{ {_INNER} }} }}
        hidden {{ {_INNER} }}
        wrapped {{ name: "pvc-1" secrets {{ key: "password" value: "hunter2" }} }}
        blobs {{ key: "cert" value: "s3cr3t-token" }}
        """,
        outer_class(),
    )
    clean = redact.redacted(original)
    _assert_no_secret_in(str(clean))
    _assert_no_secret_in(json.dumps(redact.to_log_dict(original)))
    assert "1234" not in str(clean)

    inner_clean = {
        "token": redact.REDACTED,
        "blob": "Kioqc3RyaXBwZWQqKio=",  # base64 of b"***stripped***"
        "keys": [redact.REDACTED],
        "visible": "ok",
    }
    assert redact.to_log_dict(original) == {
        "inner": inner_clean,
        "many": [inner_clean, {"visible": "second"}],
        "by_name": {"a": inner_clean},
        "hidden": {},
        "wrapped": {"name": "pvc-1", "secrets": {"password": redact.REDACTED}},
        "blobs": {"cert": "Kioqc3RyaXBwZWQqKio="},
    }
