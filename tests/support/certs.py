"""A throw-away PKI for the TLS tests, made with the `cryptography` package: a CA, a
server certificate for 127.0.0.1 / localhost signed by it, a client certificate signed by
it, and a second CA (with its own server certificate) that nothing trusts."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Pki", "make_pki", "nats_tls_block"]

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Pki:
    """Paths of PEM files in one directory."""

    ca: Path  # the CA everyone trusts
    server_cert: Path  # 127.0.0.1, ::1 and localhost; server and client use
    server_key: Path
    client_cert: Path  # CN=router, client use
    client_key: Path
    other_ca: Path  # a CA nobody trusts
    other_server_cert: Path  # 127.0.0.1 / localhost, signed by other_ca
    other_server_key: Path
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path

    def read(self, name: str) -> bytes:
        return Path(getattr(self, name)).read_bytes()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.with_suffix(".key").chmod(0o600)


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(common_name: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *,
          server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    """Write the CA, server and client certificates (and the untrusted twins) under
    `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("kv-indexer test CA")
    _write(directory / "ca", ca, ca_key)
    _write(directory / "server", *_leaf("kv-indexer test server", ca, ca_key, server=True))
    _write(directory / "client", *_leaf("router", ca, ca_key, server=False))
    other, other_key = _ca("untrusted test CA")
    _write(directory / "other-ca", other, other_key)
    _write(directory / "other-server", *_leaf("impostor", other, other_key, server=True))
    _write(directory / "other-client", *_leaf("stranger", other, other_key, server=False))
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem", server_key=directory / "server.key",
        client_cert=directory / "client.pem", client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
        other_server_cert=directory / "other-server.pem",
        other_server_key=directory / "other-server.key",
        other_client_cert=directory / "other-client.pem",
        other_client_key=directory / "other-client.key",
    )


def nats_tls_block(pki: Pki, *, verify: bool, cert: str = "server") -> str:
    """A nats-server `tls { }` block with `cert` ("server", or "other_server": a certificate
    no client trusts); `verify`: clients must present a certificate signed by the CA."""
    return (f"tls {{\n  cert_file: \"{getattr(pki, cert + '_cert')}\"\n"
            f"  key_file: \"{getattr(pki, cert + '_key')}\"\n  ca_file: \"{pki.ca}\"\n"
            f"  verify: {'true' if verify else 'false'}\n  timeout: 2\n}}")
