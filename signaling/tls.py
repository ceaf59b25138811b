"""
TLS for the HTTP/websocket port: the server's SSL context, its reload on SIGHUP, and self-signed certificates
for quick trials (``chorus serve --self-signed NAME...``).

A browser allows ``getUserMedia`` only in a secure context: any page not opened from ``localhost`` must come
over HTTPS, so a server that other machines use needs a certificate — from a proxy in front of it (Caddy in
``docker-compose.yml``), from files (``tls_cert``/``tls_key``), or self-signed for a trial (the browser then
asks once; the printed fingerprint is what to compare).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

logger = logging.getLogger("chorus.tls")

#: Self-signed certificates are made for this long (and made again when less than a day is left).
SELF_SIGNED_DAYS = 90


class TlsError(Exception):
    """A certificate or key that cannot be used (unreadable, not PEM, key does not match)."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """
    An SSL context for serving HTTPS/WSS with ``cert`` (PEM chain) and ``key``: TLS 1.2 or newer, HTTP/1.1.

    :raises TlsError: the files cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    load(context, cert, key)
    return context


def load(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """
    (Re)load ``cert`` and ``key`` into ``context``: handshakes from now on use them, connections already open
    keep theirs. On failure the context keeps what it had.

    :raises TlsError: the files cannot be loaded.
    """
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load certificate {cert} with key {key}: {exc}") from exc


def certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as browsers show it: ``AB:CD:...``."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def spki_pin(cert: x509.Certificate) -> str:
    """base64 SHA-256 of the public key (Chromium's ``--ignore-certificate-errors-spki-list`` takes it)."""
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(a) for a in san.get_values_for_type(x509.IPAddress)}


def default_folder() -> Path:
    """Where ``--self-signed`` keeps its certificate: ``$XDG_STATE_HOME/chorus`` (``~/.local/state/chorus``)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "chorus"


def self_signed(names: list[str], folder: Path | None = None) -> tuple[Path, Path]:
    """
    A self-signed certificate for ``names`` (DNS names and/or IP addresses), ECDSA P-256, in ``folder``:
    the one already there if it covers exactly these names and is valid for more than a day, else a new one.

    :returns: (certificate path, key path); the key file is readable by its owner only.
    """
    if not names:
        raise ValueError("--self-signed needs at least one name or address")
    folder = folder or default_folder()
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "self-signed.crt", folder / "self-signed.key"
    now = datetime.datetime.now(datetime.UTC)
    if cert_path.exists() and key_path.exists():
        try:
            existing = certificate(cert_path)
            if _names(existing) == set(names) and existing.not_valid_after_utc - now > datetime.timedelta(days=1):
                return cert_path, key_path
        except (ValueError, OSError):
            pass  # unreadable: make a new one
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
