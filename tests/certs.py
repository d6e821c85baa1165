"""Throwaway certificates for TLS tests, generated with cryptography into a temp directory.

`make_test_certs(testcase)` writes a whole set (root CA, intermediate CA, leaves good and
bad) into a fresh directory that the test case removes on cleanup, and returns the paths.
Certificate files hold the leaf followed by its chain, as a server's ssl_cert would. Keys
are EC P-256 for speed.
"""

import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class TestCerts:
    """Paths of the generated PEM files; `*_cert` files are leaf + intermediate CA."""

    __test__ = False  # not a test class, despite the name

    directory: str
    ca: str  # root CA certificate: the one trust anchor of these certificates
    other_ca: str  # an unrelated root CA, trusted by nothing here
    intermediate: str  # intermediate CA certificate alone (for a separate chain file)
    server_leaf: str  # the server certificate alone, without its chain
    server_cert: str
    server_key: str
    reloaded_cert: str  # a second server certificate (same names) for reload tests
    reloaded_key: str
    client_cert: str  # client certificate signed by the root CA directly
    client_key: str
    expired_cert: str
    expired_key: str
    not_yet_valid_cert: str
    not_yet_valid_key: str
    expiring_cert: str  # expires in 5 days
    expiring_key: str
    wrong_host_cert: str  # for "wrong.example" only
    wrong_host_key: str
    self_signed_cert: str  # localhost / 127.0.0.1, signed by its own key
    self_signed_key: str
    mismatched_key: str  # matches none of the certificates
    wrong_order_cert: str  # leaf, root CA, intermediate: the chain is out of order


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Optional[x509.Certificate],
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    names: Sequence[str] = (),
    ca: bool = False,
    client: bool = False,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_test_certs(directory: str, now: datetime) -> TestCerts:
    """Generate the whole set into `directory` (which must exist), valid around `now`."""
    day = timedelta(days=1)

    def write(name: str, data: bytes) -> str:
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    root_key, other_key, intermediate_key = _key(), _key(), _key()
    root = _certificate("pydio-ws test root CA", root_key, None, root_key,
                        now - day, now + 3650 * day, ca=True)
    other = _certificate("pydio-ws other CA", other_key, None, other_key,
                         now - day, now + 3650 * day, ca=True)
    intermediate = _certificate("pydio-ws test intermediate CA", intermediate_key, root,
                                root_key, now - day, now + 3650 * day, ca=True)

    def leaf(subject, not_before, not_after, names=SERVER_NAMES):
        key = _key()
        certificate = _certificate(subject, key, intermediate, intermediate_key,
                                   not_before, not_after, names)
        return certificate, key

    paths = {}
    server, server_key = leaf("localhost", now - day, now + 365 * day)
    paths["server_leaf"] = write("server-leaf.pem", _pem(server))
    paths["server_cert"] = write("server.pem", _pem(server, intermediate))
    paths["server_key"] = write("server.key", _key_pem(server_key))
    paths["wrong_order_cert"] = write("wrong-order.pem", _pem(server, root, intermediate))
    variants = {
        "reloaded": ("localhost", now - day, now + 200 * day, SERVER_NAMES),
        "expired": ("localhost", now - 30 * day, now - day, SERVER_NAMES),
        "not_yet_valid": ("localhost", now + day, now + 30 * day, SERVER_NAMES),
        "expiring": ("localhost", now - day, now + 5 * day, SERVER_NAMES),
        "wrong_host": ("wrong.example", now - day, now + 365 * day, ("wrong.example",)),
    }
    for prefix, (subject, not_before, not_after, names) in variants.items():
        certificate, key = leaf(subject, not_before, not_after, names)
        stem = prefix.replace("_", "-")
        paths[f"{prefix}_cert"] = write(f"{stem}.pem", _pem(certificate, intermediate))
        paths[f"{prefix}_key"] = write(f"{stem}.key", _key_pem(key))

    client_key = _key()
    client = _certificate("pydio-ws test client", client_key, root, root_key,
                          now - day, now + 365 * day, client=True)
    self_signed_key = _key()
    self_signed = _certificate("localhost", self_signed_key, None, self_signed_key,
                               now - day, now + 365 * day, SERVER_NAMES)
    return TestCerts(
        directory=directory,
        ca=write("ca.pem", _pem(root)),
        other_ca=write("other-ca.pem", _pem(other)),
        intermediate=write("intermediate.pem", _pem(intermediate)),
        client_cert=write("client.pem", _pem(client)),
        client_key=write("client.key", _key_pem(client_key)),
        self_signed_cert=write("self-signed.pem", _pem(self_signed)),
        self_signed_key=write("self-signed.key", _key_pem(self_signed_key)),
        mismatched_key=write("mismatched.key", _key_pem(_key())),
        **paths,
    )


def make_test_certs(testcase, now: Optional[datetime] = None) -> TestCerts:
    """A fresh set in a new temp directory that `testcase` removes on cleanup."""
    directory = tempfile.mkdtemp(prefix="pydio-ws-certs-")
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return write_test_certs(directory, now or datetime.now(timezone.utc))
