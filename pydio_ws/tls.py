"""TLS for both sides: the reloadable server context and the client policy for the Pydio host.

Server side: `load_server_credentials` reads and checks the PEM files of one listener
(certificate followed by its chain, key, optional separate chain, optional client CA) and
raises `TLSError` with one line that can stop startup. `ReloadableServerContextFactory`
turns them into an OpenSSL context (TLS 1.2 floor, ECDHE + AEAD ciphers, ALPN http/1.1,
optional client certificates) and can swap in re-read files for new connections only.

Client side: `client_tls_policy` builds the `IPolicyForHTTPS` given to the Agent that talks
to the Pydio host; verified connections check the chain and the host name, and a refusal
reaches the Agent's errback as a `TLSVerifyError` that `describe_tls_failure` turns into one
precise line.
"""

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

HTTP_1_1 = b"http/1.1"

# Mozilla "intermediate" TLS 1.2 suites: forward secret and AEAD only. TLS 1.3 suites are
# OpenSSL's defaults, which are all acceptable.
SERVER_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# X509_V_ERR_* codes from OpenSSL's x509_vfy.h with OpenSSL's own wording; pyOpenSSL hands
# the verify callback only the number.
_VERIFY_REASONS = {
    2: "unable to get issuer certificate",
    4: "unable to decrypt certificate's signature",
    6: "unable to decode issuer public key",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    13: "format error in certificate's notBefore field",
    14: "format error in certificate's notAfter field",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "issuer certificate lacks a public key",
    25: "path length constraint exceeded",
    26: "unsupported certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
    32: "key usage does not include certificate signing",
    34: "unhandled critical extension",
    37: "invalid non-CA certificate (has CA markings)",
    66: "EE certificate key too weak",
    67: "CA certificate key too weak",
    68: "CA signature digest algorithm too weak",
}


class TLSError(Exception):
    """Unusable TLS files or settings; the message is one line that can stop startup."""


class TLSVerifyError(Exception):
    """A peer certificate refused by a verifying client; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ServerTLSFiles:
    """PEM paths of one listener; `label` ("public", "private") prefixes error messages.

    `cert` holds the certificate followed by its chain; `chain` is an optional separate
    chain file; `client_ca`, when set, makes client certificates signed by it mandatory.
    """

    cert: str
    key: str
    chain: str = ""
    client_ca: str = ""
    label: str = "public"


@dataclass(frozen=True)
class ServerCredentials:
    """Checked contents of a `ServerTLSFiles`: certificate, chain, key, client CAs."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    client_cas: tuple[x509.Certificate, ...]
    names: tuple[str, ...]
    not_after: datetime

    def expires_soon(self, now: datetime, days: int = 14) -> bool:
        """True when the certificate expires less than `days` days after `now`."""
        return self.not_after - _utc(now) < timedelta(days=days)


def _utc(moment: datetime) -> datetime:
    """`moment` as an aware UTC datetime; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _iso(moment: datetime) -> str:
    return _utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(key: str, path: str) -> bytes:
    """The bytes of `path`, or TLSError naming the config key and the file."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TLSError(f"{key} {path}: no such file") from None
    except PermissionError:
        raise TLSError(f"{key} {path}: permission denied") from None
    except IsADirectoryError:
        raise TLSError(f"{key} {path}: is a directory") from None
    except OSError as e:
        raise TLSError(f"{key} {path}: {e.strerror or e}") from None


def _read_certificates(key: str, path: str) -> tuple[x509.Certificate, ...]:
    """All PEM certificates of `path`, in file order; TLSError if there is none."""
    data = _read(key, path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TLSError(f"{key} {path}: no PEM certificate found")
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except ValueError as e:
        raise TLSError(f"{key} {path}: unreadable PEM certificate ({e})") from None


def _read_key(key: str, path: str) -> PrivateKeyTypes:
    """The first PEM private key of `path`; encrypted keys are refused."""
    data = _read(key, path)
    if b"PRIVATE KEY-----" not in data:
        raise TLSError(f"{key} {path}: no PEM private key found")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSError(f"{key} {path}: encrypted private keys are not supported") from None
    except ValueError as e:
        raise TLSError(f"{key} {path}: unreadable PEM private key ({e})") from None


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """DNS and IP subjectAltNames, then the common name when it is not among them."""
    names = []
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        pass
    else:
        names.extend(sans.value.get_values_for_type(x509.DNSName))
        names.extend(str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress))
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if isinstance(attribute.value, str) and attribute.value not in names:
            names.append(attribute.value)
    return tuple(names)


def _check_chain_order(label: str, certificates: Sequence[x509.Certificate]) -> None:
    """Each certificate must be issued by the one after it (leaf first, root-most last)."""
    for position, (current, following) in enumerate(zip(certificates, certificates[1:])):
        if current.issuer != following.subject:
            raise TLSError(
                f"{label}.ssl_cert chain out of order: certificate {position + 1}"
                f" ({current.subject.rfc4514_string()}) is issued by"
                f" {current.issuer.rfc4514_string()}, but certificate {position + 2}"
                f" is {following.subject.rfc4514_string()}"
            )


def load_server_credentials(files: ServerTLSFiles, now: datetime) -> ServerCredentials:
    """Read and check the PEM files of one listener, or raise TLSError saying what is wrong.

    Checks: files readable, PEM parses, key matches the certificate, the certificate is
    valid at `now`, and the chain (rest of the cert file, then the chain file) is in order.
    """
    label = files.label
    cert_key, key_key = f"{label}.ssl_cert", f"{label}.ssl_key"
    certificates = _read_certificates(cert_key, files.cert)
    if files.chain:
        certificates += _read_certificates(f"{label}.ssl_chain", files.chain)
    private_key = _read_key(key_key, files.key)
    client_cas = ()
    if files.client_ca:
        client_cas = _read_certificates(f"{label}.ssl_client_ca", files.client_ca)

    leaf = certificates[0]
    if _public_bytes(private_key.public_key()) != _public_bytes(leaf.public_key()):
        raise TLSError(f"{key_key} does not match {cert_key}")
    moment = _utc(now)
    if leaf.not_valid_after_utc < moment:
        raise TLSError(f"{cert_key} expired on {_iso(leaf.not_valid_after_utc)}")
    if leaf.not_valid_before_utc > moment:
        raise TLSError(f"{cert_key} is not valid before {_iso(leaf.not_valid_before_utc)}")
    _check_chain_order(label, certificates)
    return ServerCredentials(
        certificate=leaf,
        chain=certificates[1:],
        key=private_key,
        client_cas=client_cas,
        names=certificate_names(leaf),
        not_after=leaf.not_valid_after_utc,
    )


def describe_certificate(credentials: ServerCredentials, now: datetime) -> str:
    """One line for check-config: names, expiry date and days left (or since expiry)."""
    left = credentials.not_after - _utc(now)
    days = round(abs(left) / timedelta(days=1))
    names = ", ".join(credentials.names) or "(no names)"
    if left < timedelta(0):
        return f"names: {names}; expired {_iso(credentials.not_after)} ({days} days ago)"
    return f"names: {names}; expires {_iso(credentials.not_after)} (in {days} days)"


def _select_alpn(connection: SSL.Connection, offered: Sequence[bytes]):
    # Without http/1.1 on offer the handshake goes on with no protocol selected (the
    # extension is not acknowledged); a client that insists on another protocol hangs up.
    if HTTP_1_1 in offered:
        return HTTP_1_1
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _openssl_reason(error: SSL.Error) -> str:
    """The reason strings of an OpenSSL error queue, joined, or the error's text."""
    queue = error.args[0] if error.args else None
    if isinstance(queue, list) and queue and all(
        isinstance(entry, tuple) and len(entry) == 3 for entry in queue
    ):
        return "; ".join(entry[2] for entry in queue if entry[2])
    return str(error)


def _server_context(files: ServerTLSFiles, credentials: ServerCredentials) -> SSL.Context:
    """An OpenSSL server context for `credentials`; TLSError if OpenSSL refuses them."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(
            SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
        )
        context.set_cipher_list(SERVER_CIPHERS)
        context.set_alpn_select_callback(_select_alpn)
        context.use_certificate(credentials.certificate)
        for certificate in credentials.chain:
            context.add_extra_chain_cert(certificate)
        context.use_privatekey(credentials.key)
        context.check_privatekey()
        # Session resumption with client certificates needs a session id context.
        context.set_session_id(b"pydio-ws")
        if credentials.client_cas:
            store = context.get_cert_store()
            for ca in credentials.client_cas:
                store.add_cert(_openssl_x509(ca))
                context.add_client_ca(ca)
            context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    except SSL.Error as e:
        raise TLSError(
            f"{files.label}.ssl_cert refused by OpenSSL: {_openssl_reason(e)}"
        ) from None
    return context


def _openssl_x509(certificate: x509.Certificate) -> X509:
    # X509Store.add_cert still takes pyOpenSSL's own certificate type.
    return X509.from_cryptography(certificate)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerContextFactory:
    """Server connection creator whose certificate can be re-read while running.

    Pass it to `SSL4ServerEndpoint` or `TLSMemoryBIOFactory`. `reload(now)` affects new
    connections only: an open connection keeps the context it was created with.
    """

    def __init__(self, files: ServerTLSFiles, now: datetime):
        self._files = files
        self._credentials = load_server_credentials(files, now)
        self._context = _server_context(files, self._credentials)

    @property
    def credentials(self) -> ServerCredentials:
        """The credentials new connections are served with."""
        return self._credentials

    def reload(self, now: datetime) -> ServerCredentials:
        """Re-read the files for new connections; on TLSError the old context stays."""
        credentials = load_server_credentials(self._files, now)
        context = _server_context(self._files, credentials)
        self._credentials, self._context = credentials, context
        return credentials

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        """A connection on the current context (Twisted sets the accept state)."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection


def _client_context(trusted: Optional[tuple[x509.Certificate, ...]]) -> SSL.Context:
    """A client context trusting `trusted`, or the system store when it is None."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION)
    if trusted is None:
        context.set_default_verify_paths()
    else:
        store = context.get_cert_store()
        for ca in trusted:
            store.add_cert(_openssl_x509(ca))
    return context


def _host(netloc_host: bytes) -> str:
    """The Agent's host bytes as text, without the brackets of an IPv6 literal."""
    return netloc_host.decode("ascii").strip("[]")


def _server_name(hostname: str) -> Optional[bytes]:
    """The SNI bytes for `hostname`, None for an IP address literal (RFC 6066)."""
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return hostname.encode("idna")
    return None


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    """Client connections sending SNI for a DNS name; no verification of their own."""

    def __init__(self, hostname: str, context: SSL.Context):
        self._hostname = hostname
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        server_name = _server_name(self._hostname)
        if server_name is not None:
            connection.set_tlsext_host_name(server_name)
        return connection


class _VerifyingCreator(_ClientCreator):
    """Client connections that check the chain, then the host name of the leaf."""

    _log = Logger()

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = super().clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER, self._verifier(tlsProtocol))
        return connection

    def _verifier(self, tlsProtocol):
        failed = []

        def verify(connection, certificate, errno, depth, ok):
            # An exception raised here would be lost by pyOpenSSL (connection-level
            # callback), so everything is caught and the refusal goes through
            # failVerification, which makes it the reason the Agent reports.
            try:
                if failed:
                    return False
                if not ok:
                    reason = _VERIFY_REASONS.get(errno, f"X509 verify error {errno}")
                    failed.append(
                        TLSVerifyError(f"certificate verify failed ({reason})")
                    )
                elif depth == 0:
                    mismatch = self._host_mismatch(certificate.to_cryptography())
                    if mismatch is not None:
                        failed.append(mismatch)
                if failed:
                    tlsProtocol.failVerification(Failure(failed[0]))
                    return False
                return True
            except BaseException:
                self._log.failure("while verifying the certificate of {host}",
                                  host=self._hostname)
                return False

        return verify

    def _host_mismatch(self, certificate: x509.Certificate) -> Optional[TLSVerifyError]:
        try:
            if _server_name(self._hostname) is None:
                verify_certificate_ip_address(certificate, self._hostname)
            else:
                verify_certificate_hostname(certificate, self._hostname)
        except (VerificationError, CertificateError):
            names = ", ".join(certificate_names(certificate)) or "no names"
            return TLSVerifyError(
                f"host name mismatch: certificate is for {names}, not {self._hostname}"
            )
        return None


@implementer(IPolicyForHTTPS)
class _VerifyingPolicy:
    """HTTPS policy trusting the given CA certificates, or the system store if None."""

    def __init__(self, trusted: Optional[tuple[x509.Certificate, ...]]):
        # One context serves every connection: the verify callback is per connection.
        self._context = _client_context(trusted)

    def creatorForNetloc(self, hostname: bytes, port: int):
        return _VerifyingCreator(_host(hostname), self._context)


@implementer(IPolicyForHTTPS)
class _UnverifiedPolicy:
    """HTTPS policy with no certificate or host name verification at all."""

    def __init__(self):
        self._context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context.set_verify(SSL.VERIFY_NONE)

    def creatorForNetloc(self, hostname: bytes, port: int):
        return _ClientCreator(_host(hostname), self._context)


def client_tls_policy(verify: bool, ca_file: str = "") -> IPolicyForHTTPS:
    """The HTTPS policy for the Agent that talks to the Pydio host.

    verify with no `ca_file`: the system trust store; verify with `ca_file`: exactly the
    CA certificates of that file; both check the host name. verify=False checks nothing.
    A bad `ca_file` raises TLSError.
    """
    if not verify:
        return _UnverifiedPolicy()
    if not ca_file:
        return _VerifyingPolicy(None)
    return _VerifyingPolicy(_read_certificates("CA file", ca_file))


def _unwrap(failure) -> list:
    """The innermost exceptions of a failure, through the Agent's wrapper exceptions.

    ResponseNeverReceived, ResponseFailed, RequestGenerationFailed and
    RequestTransmissionFailed all carry a list of Failures in `reasons`.
    """
    value = failure.value if isinstance(failure, Failure) else failure
    reasons = getattr(value, "reasons", None)
    if isinstance(reasons, list):
        found = []
        for reason in reasons:
            found.extend(_unwrap(reason))
        return found
    return [value]


def _identity(service_id) -> str:
    """The host name or address a service_identity ID stands for."""
    for attribute in ("hostname", "ip"):
        value = getattr(service_id, attribute, None)
        if value is not None:
            return value.decode("ascii") if isinstance(value, bytes) else str(value)
    return str(service_id)


def _describe(error: BaseException) -> Optional[str]:
    """One line for a TLS refusal, None when `error` is not about TLS."""
    if isinstance(error, TLSVerifyError):
        return f"TLS: {error.reason}"
    if isinstance(error, VerificationError):
        # Twisted's own creators report only the identity that was looked for.
        wanted = ", ".join(_identity(mismatch.mismatched_id) for mismatch in error.errors)
        return f"TLS: host name mismatch: certificate is not for {wanted}"
    if isinstance(error, SSL.Error):
        return f"TLS: {_openssl_reason(error)}"
    return None


def describe_tls_failure(failure) -> str:
    """A short precise reason for a failed HTTPS request (a Failure or an exception).

    TLS refusals read "TLS: certificate verify failed (...)" or "TLS: host name mismatch:
    ..."; anything else is "<ExceptionType>: <message>".
    """
    errors = _unwrap(failure)
    for error in errors:
        description = _describe(error)
        if description is not None:
            return description
    error = errors[0] if errors else failure
    return f"{type(error).__name__}: {error}"
