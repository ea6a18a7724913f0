"""Mutual TLS between agents: gRPC credentials from certificate files.

In Kubernetes the chart (or cert-manager) issues each agent a certificate; without it,
``sharedsync-agent certs`` makes them (:mod:`replication_agent.dev_pki`). Peers verify each
other against the CA and the name every agent certificate carries, so an agent only talks to
agents of its own cluster. This module stays small on purpose: the operator dials agents with
it, and needs neither the certificate toolkit nor the agent's config models in memory.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc

#: The name every agent certificate carries, so peers dialled by address can verify it.
PEER_SERVER_NAME = "agent.sharedsync.internal"
#: The name the operator's client certificate carries (the chart issues it; the CSI controller
#: shares it): agents let it call their control API (config ``controllerNames``).
CONTROLLER_NAME = "sharedsync-operator"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Mutual TLS between agents: every peer presents a certificate signed by ``ca``.

    A plain dataclass, validated by pydantic where it is part of the agent's config file
    (unknown keys refused there too).
    """

    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid"}

    ca: Path
    cert: Path
    key: Path


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Serve with our certificate and demand a client certificate signed by the CA."""
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=tls.ca.read_bytes(), require_client_auth=True)


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Dial peers presenting our certificate and trusting only the CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(), private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes())
