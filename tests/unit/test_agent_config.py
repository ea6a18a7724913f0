"""The agent's config file: validation names the field, ${VAR} comes from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from replication_agent.config import load_config
from replication_agent.tls import TlsConfig
from sharedsync.core.errors import InvalidArgument


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_environment_variables_fill_per_node_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "node: ${NODE_NAME}\nlisten: ${POD_IP}:7400\n"
                           "kubernetes: {namespace: sharedsync}\n")
    config = load_config(path, {"NODE_NAME": "node-a", "POD_IP": "127.0.0.1"})
    assert config.node == "node-a"
    assert config.listen == "127.0.0.1:7400"
    assert config.advertise_address == "127.0.0.1:7400"
    assert config.kubernetes is not None
    assert config.kubernetes.lease_duration_seconds == 15


def test_an_unset_variable_is_an_error_naming_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, "node: a\nlisten: ${POD_IP}:7400\n")
    with pytest.raises(InvalidArgument, match="listen: environment variable POD_IP is not set"):
        load_config(path, {})


def test_a_dollar_without_braces_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "node: a$b\nlisten: 127.0.0.1:7400\n")
    assert load_config(path, {}).node == "a$b"


@pytest.mark.parametrize(("text", "message"), [
    ("node: a\nlisten: 127.0.0.1:7400\nkubernetes: {namespace: x, leaseDurationSeconds: 1}\n",
     "kubernetes.leaseDurationSeconds"),
    ("node: a\nlisten: 127.0.0.1:7400\nkubernetes: {}\n", "kubernetes.namespace"),
    ("node: a\nlisten: 127.0.0.1:7400\nkubernetes: {namespace: x, color: blue}\n",
     "kubernetes.color"),
    ("node: a\nlisten: 10.1.2.3:7400\n", "tls (ca, cert, key) is required"),
    ("node: a\nlisten: 10.1.2.3:7400\ntls: {ca: /p/ca.crt}\n", "tls.cert: Field required"),
    ("node: a\nlisten: 10.1.2.3:7400\ntls: {ca: /c, cert: /c, key: /k, pass: x}\n", "tls.pass"),
])
def test_bad_configs_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, text), {})


def test_tls_files_are_read_as_paths(tmp_path: Path) -> None:
    path = write(tmp_path, "node: a\nlisten: 10.1.2.3:7400\n"
                           "tls: {ca: /p/ca.crt, cert: /p/a.crt, key: /p/a.key}\n")
    assert load_config(path, {}).tls == TlsConfig(
        ca=Path("/p/ca.crt"), cert=Path("/p/a.crt"), key=Path("/p/a.key"))
