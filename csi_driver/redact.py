"""Strip CSI secrets from protobuf messages before they are logged.

The CSI spec marks credential-carrying fields (the ``secrets`` maps on most
requests) with the ``csi_secret`` field option. Those values must never reach
a log line, an error message or a trace. :func:`redacted` returns a copy of
any message with every such field, at any depth, overwritten, and
:func:`to_log_dict` turns that copy into a plain dict for structured logging.

Redaction rules for a field marked ``csi_secret``:

* ``map<K, string|bytes>``: keys are kept (they name *which* credentials were
  sent, which helps debugging), every value becomes :data:`REDACTED`.
* ``string``/``bytes`` (singular or repeated): every value becomes
  :data:`REDACTED` (empty singular values stay empty).
* message-valued (singular, repeated or map values): each message is cleared.
* anything else: the field is cleared.

Fields that are not secret but hold messages are walked recursively, so a
secret nested anywhere inside a request is caught too.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from csi_driver.proto import csi_pb2

__all__ = [
    "REDACTED",
    "is_secret",
    "redacted",
    "secret_field_names",
    "secret_fields_in_file",
    "to_log_dict",
]

REDACTED = "***stripped***"
"""Placeholder written over every secret string value."""

_REDACTED_BYTES = REDACTED.encode()

_M = TypeVar("_M", bound=Message)


def is_secret(field: FieldDescriptor) -> bool:
    """Whether ``field`` carries the ``(csi.v1.csi_secret) = true`` option."""
    return field.GetOptions().Extensions[csi_pb2.csi_secret]


def secret_field_names(descriptor: Descriptor) -> frozenset[str]:
    """Names of the fields declared directly on ``descriptor`` marked ``csi_secret``.

    Nested message types are not included; see :func:`secret_fields_in_file`.
    """
    return frozenset(f.name for f in descriptor.fields if is_secret(f))


def secret_fields_in_file(file: FileDescriptor) -> set[str]:
    """Full names (``csi.v1.CreateVolumeRequest.secrets``) of every secret field.

    Walks all message types of ``file``, including nested ones.
    """
    found: set[str] = set()
    pending: list[Descriptor] = list(file.message_types_by_name.values())
    while pending:
        descriptor = pending.pop()
        found.update(f.full_name for f in descriptor.fields if is_secret(f))
        pending.extend(descriptor.nested_types)
    return found


def redacted(message: _M) -> _M:
    """Return a copy of ``message`` with every ``csi_secret`` field overwritten.

    The argument is left untouched. The result has the same type, so it can be
    fed to anything that expects the original message (e.g. ``str()``,
    :func:`~google.protobuf.json_format.MessageToDict`).
    """
    copy = type(message)()
    copy.CopyFrom(message)
    _redact_in_place(copy)
    return copy


def to_log_dict(message: Message) -> dict[str, object]:
    """A JSON-ready dict of ``message`` with secrets redacted.

    Field names are the proto names (``volume_id``, not ``volumeId``); fields
    left at their default value are omitted, as in the protobuf JSON mapping.
    """
    result: dict[str, object] = MessageToDict(redacted(message), preserving_proto_field_name=True)
    return result


def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return entry is not None and entry.GetOptions().map_entry


def _redact_in_place(message: Message) -> None:
    for field, value in message.ListFields():
        if is_secret(field):
            _overwrite_secret(message, field, value)
        elif field.message_type is None:
            continue
        elif _is_map(field):
            map_value = field.message_type.fields_by_name["value"]
            if map_value.message_type is not None:
                for item in value.values():
                    _redact_in_place(item)
        elif field.is_repeated:
            for item in value:
                _redact_in_place(item)
        else:
            _redact_in_place(value)


def _placeholder(field: FieldDescriptor) -> str | bytes | None:
    if field.type == FieldDescriptor.TYPE_STRING:
        return REDACTED
    if field.type == FieldDescriptor.TYPE_BYTES:
        return _REDACTED_BYTES
    return None


def _overwrite_secret(message: Message, field: FieldDescriptor, value: Any) -> None:
    if _is_map(field):
        assert field.message_type is not None
        map_value = field.message_type.fields_by_name["value"]
        if map_value.message_type is not None:
            for item in value.values():
                item.Clear()
            return
        placeholder = _placeholder(map_value)
        if placeholder is not None:
            for key in list(value):
                value[key] = placeholder
            return
    elif field.message_type is not None:
        items = value if field.is_repeated else [value]
        for item in items:
            item.Clear()
        return
    else:
        placeholder = _placeholder(field)
        if placeholder is not None:
            if field.is_repeated:
                value[:] = [placeholder] * len(value)
            else:
                setattr(message, field.name, placeholder)
            return
    if field.is_extension:  # proto2-style extension; CSI has none, but be safe
        message.ClearExtension(cast("Any", field))
    else:
        message.ClearField(field.name)
