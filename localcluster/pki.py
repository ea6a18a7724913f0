"""A throwaway certificate authority for clusters made on this machine.

Both the control-plane test tier (tests/controlplane) and the local cluster (scripts/cluster) need
the same few things: one CA that the apiserver trusts for client certificates and that signs
every serving certificate, serving certificates for an apiserver or a kubelet, client
certificates for kubelets, kube-proxy and the apiserver's own calls to kubelets, and the RSA key
that signs service-account tokens. Nothing here is for production: the CA key sits next to the
certificates, unencrypted, and lives as long as the cluster.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: How long the certificates are valid (a cluster outliving this is recreated by `up`).
VALIDITY = datetime.timedelta(days=30)


def pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def write_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to ``path`` with ``mode`` (keys stay private to root)."""
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _load_ca(cert_file: Path,
             key_file: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_file}: not an EC key")
    return cert, key


@dataclass
class Pki:
    """A CA, certificates signed by it, and the service-account signing key, under ``dir``.

    A directory that already holds a CA is reused (``scripts/cluster up`` run again keeps the
    certificates every node and kubeconfig already trusts); otherwise a new one is made.
    """

    dir: Path
    ca_file: Path = field(init=False)
    ca_key_file: Path = field(init=False)
    sa_key_file: Path = field(init=False)
    sa_pub_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.dir / "ca.crt"
        self.ca_key_file = self.dir / "ca.key"
        self.sa_key_file = self.dir / "sa.key"
        self.sa_pub_file = self.dir / "sa.pub"
        now = datetime.datetime.now(datetime.UTC)
        self._not_before = now - datetime.timedelta(hours=1)
        self._not_after = now + VALIDITY
        if self.ca_file.exists() and self.ca_key_file.exists() and self.sa_key_file.exists():
            self._ca_cert, self._ca_key = _load_ca(self.ca_file, self.ca_key_file)
            return
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sharedsync-test-ca")])
        self._ca_cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self._ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before).not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key()),
                           critical=False)
            .sign(self._ca_key, hashes.SHA256()))
        write_file(self.ca_key_file, pem_key(self._ca_key))
        write_file(self.ca_file, self._ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_file(self.sa_pub_file, sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
        write_file(self.sa_key_file, pem_key(sa_key))

    def _issue(self, name: str, subject: x509.Name, usage: x509.ObjectIdentifier,
               sans: Sequence[x509.GeneralName]) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(subject)
            .issuer_name(self._ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before).not_valid_after(self._not_after)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._ca_key.public_key()), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)),
                                            critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        return (write_file(self.dir / f"{name}.crt",
                           cert.public_bytes(serialization.Encoding.PEM), 0o644),
                write_file(self.dir / f"{name}.key", pem_key(key)))

    def serving_cert(self, name: str, dns: Sequence[str], ips: Sequence[str]) -> tuple[Path, Path]:
        """A server certificate for ``dns``/``ips``; returns (cert file, key file)."""
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return self._issue(name, subject, ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def client_cert(self, name: str, user: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
        """A client certificate: the apiserver reads the user from CN and groups from O."""
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, user))
        return self._issue(name, x509.Name(attributes), ExtendedKeyUsageOID.CLIENT_AUTH, ())
