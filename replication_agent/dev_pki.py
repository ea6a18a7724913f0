"""A small CA for standalone clusters: ``sharedsync-agent certs`` and the tests' agents.

In Kubernetes the chart (or cert-manager) issues the agents' certificates instead. Kept apart
from :mod:`replication_agent.tls` so that processes which only dial agents never load the
certificate toolkit.
"""

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .tls import PEER_SERVER_NAME, TlsConfig


@dataclass(frozen=True, slots=True)
class IssuedNode:
    """Where :func:`issue_dev_pki` wrote one node's files."""

    node: str
    tls: TlsConfig


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sharedsync"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def issue_dev_pki(directory: Path, nodes: dict[str, str], *, days: int = 365,
                  controllers: Sequence[str] = ()) -> list[IssuedNode]:
    """Create a CA and a certificate per node (``name -> address``) under ``directory``, plus
    a client certificate per name in ``controllers`` (CN and DNS name the controller's name,
    client auth only: it may call the agents' control API, not act as a peer)."""
    clash = set(controllers) & set(nodes)
    if clash:
        raise ValueError(f"a controller cannot be named like a node: {sorted(clash)}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("sharedsync agent CA"))
               .issuer_name(_name("sharedsync agent CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / "ca.key", ca_key)

    def issue(name: str, alt_names: list[x509.GeneralName],
              usages: list[x509.ObjectIdentifier]) -> IssuedNode:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return IssuedNode(name, TlsConfig(ca=ca_path, cert=cert_path, key=key_path))

    issued = []
    for node, address in nodes.items():
        names: list[x509.GeneralName] = [x509.DNSName(PEER_SERVER_NAME), x509.DNSName(node)]
        host = address.rpartition(":")[0].strip("[]") if ":" in address else address
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
        issued.append(issue(node, names, [ExtendedKeyUsageOID.SERVER_AUTH,
                                          ExtendedKeyUsageOID.CLIENT_AUTH]))
    for controller in controllers:
        issued.append(issue(controller, [x509.DNSName(controller)],
                            [ExtendedKeyUsageOID.CLIENT_AUTH]))
    return issued
