"""TLS for every gRPC connection of a swarm: a lab's own certificate authority, one certificate per machine.

A lab makes one CA (`tsotsa tls init`), issues each machine a key and a certificate for the names and
addresses others reach it at (`tsotsa tls issue`), and starts every tool with the three files
(`--tls-cert/--tls-key/--tls-ca` or TSOTSA_TLS_*). Then every connection is mutual TLS: servers present
their certificate and clients check it against the lab CA and the host they dialled; clients present theirs
and servers admit only certificates the lab CA signed. Machines without a lab certificate cannot even open a
connection; the swarm token still travels inside it.

`TlsSettings` is the one home of the three files, read and checked once; `tsotsa.rpc` turns it into gRPC
credentials. Kept free of torch and gRPC; `cryptography` is imported only when certificates are made or read.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tsotsa.errors import TsotsaError

ENV_CERT, ENV_KEY, ENV_CA = "TSOTSA_TLS_CERT", "TSOTSA_TLS_KEY", "TSOTSA_TLS_CA"
CA_KEY, CA_CERT = "ca.key", "ca.crt"
CA_DAYS = 3650
MACHINE_DAYS = 825
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DNS_NAME = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")


class TlsError(TsotsaError):
    """TLS files that are missing, unreadable, inconsistent, or certificates that cannot be made."""


@dataclass(frozen=True)
class TlsSettings:
    """This machine's certificate and key and the lab CA's certificate, as paths and as the PEM bytes read
    from them once (a process never rereads them)."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def load(cls, cert: Path | str | None, key: Path | str | None, ca: Path | str | None) -> "TlsSettings | None":
        """The settings from the three files, or None when none is given (TLS off). Every problem that would
        otherwise surface as an opaque handshake failure on some later connection is one `TlsError` here: a
        missing file, a partial setting, a certificate the CA did not sign, a key of another certificate, a
        certificate out of its validity period."""
        given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
        if not any(given.values()):
            return None
        missing = [flag for flag, value in given.items() if not value]
        if missing:
            raise TlsError(f"TLS needs all of --tls-cert, --tls-key and --tls-ca (or {ENV_CERT}, {ENV_KEY}, "
                           f"{ENV_CA}); missing {', '.join(missing)}")
        paths = [Path(cert).expanduser(), Path(key).expanduser(), Path(ca).expanduser()]
        contents = []
        for flag, path in zip(given, paths):
            try:
                contents.append(path.read_bytes())
            except OSError as error:
                raise TlsError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
        settings = cls(*paths, *contents)
        settings._check()
        return settings

    @classmethod
    def from_env(cls) -> "TlsSettings | None":
        """The settings TSOTSA_TLS_CERT, TSOTSA_TLS_KEY and TSOTSA_TLS_CA name, as the command-line tools read
        them (None when none is set)."""
        return cls.load(os.environ.get(ENV_CERT), os.environ.get(ENV_KEY), os.environ.get(ENV_CA))

    def _check(self) -> None:
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization

        ca = _read_cert(self.ca, self.ca_path, "--tls-ca")
        cert = _read_cert(self.cert, self.cert_path, "--tls-cert")
        try:
            key = serialization.load_pem_private_key(self.key, password=None)
        except (ValueError, TypeError) as error:
            raise TlsError(f"--tls-key {self.key_path}: not an unencrypted PEM private key ({error})") from None
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as error:
            raise TlsError(f"--tls-cert {self.cert_path} is not signed by the CA of --tls-ca {self.ca_path} "
                           f"({type(error).__name__})") from None
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if (key.public_key().public_bytes(serialization.Encoding.DER, public)
                != cert.public_key().public_bytes(serialization.Encoding.DER, public)):
            raise TlsError(f"--tls-key {self.key_path} is not the key of --tls-cert {self.cert_path}")
        now = datetime.datetime.now(datetime.timezone.utc)
        for flag, path, certificate in (("--tls-ca", self.ca_path, ca), ("--tls-cert", self.cert_path, cert)):
            if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
                raise TlsError(f"{flag} {path} is valid only from {certificate.not_valid_before_utc:%Y-%m-%d} "
                               f"to {certificate.not_valid_after_utc:%Y-%m-%d}")
        try:
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            raise TlsError(f"--tls-cert {self.cert_path} names no host (no subject alternative name); "
                           "issue one with: tsotsa tls issue") from None

    @property
    def hosts(self) -> list[str]:
        """The DNS names and IP addresses this machine's certificate is valid for."""
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(self.cert)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [*names.get_values_for_type(x509.DNSName),
                *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]

    def check_serves(self, host: str) -> None:
        """Refuses to serve under `host` (the address others dial) a certificate that does not name it: every
        client would refuse this server, each with a handshake error, long after start-up. Listening on every
        address (0.0.0.0, ::) says nothing of the name clients use and is not checked."""
        if host in ("0.0.0.0", "::", ""):
            return
        if not _matches(host, self.hosts):
            raise TlsError(f"--tls-cert {self.cert_path} is for {', '.join(self.hosts)}, not for {host}, the "
                           f"address others reach this machine at; issue one with: tsotsa tls issue DIR NAME "
                           f"--host {host}")

    def env(self) -> dict[str, str]:
        """The environment variables that give these settings to a child process."""
        return {ENV_CERT: str(self.cert_path), ENV_KEY: str(self.key_path), ENV_CA: str(self.ca_path)}


def _read_cert(data: bytes, path: Path, flag: str):
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TlsError(f"{flag} {path}: not a PEM certificate") from None


def _matches(host: str, names: list[str]) -> bool:
    """Whether `host` is one of the certificate's names, as a TLS client checks it (one leading wildcard
    label at most; IP addresses compared as addresses)."""
    address = _ip(host)
    for name in names:
        if address is not None:
            if _ip(name) == address:
                return True
            continue
        name, wanted = name.lower().rstrip("."), host.lower().rstrip(".")
        if name == wanted or (name.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == name[2:]):
            return True
    return False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


# ------------------------------------------------------------------ making the lab's certificates


def init_ca(directory: Path, name: str = "tsotsa lab CA") -> tuple[Path, Path]:
    """Makes the lab CA in `directory`: `ca.key` (mode 0600; keep it on one machine) and the self-signed
    `ca.crt` every machine gets. Refuses to overwrite either. Returns (key path, certificate path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    _refuse_existing(key_path, cert_path)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory, key_path, _key_pem(key), secret=True)
    _write(directory, cert_path, _cert_pem(cert), secret=False)
    return key_path, cert_path


def issue(directory: Path, name: str, hosts: list[str]) -> tuple[Path, Path]:
    """Issues `NAME.key` (mode 0600) and `NAME.crt` in `directory`, signed by the CA there, valid for each of
    `hosts` (an IP address where one parses, else a DNS name) as a server and as a client. Refuses to
    overwrite either. Returns (key path, certificate path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    if not _NAME.match(name) or name in ("ca", CA_KEY, CA_CERT):
        raise TlsError(f"machine name {name!r}: use letters, digits, '.', '_' or '-' (and not 'ca')")
    if not hosts:
        raise TlsError("give at least one --host: a name or address other machines reach this one at")
    alt_names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        address = _ip(host)
        if address is not None:
            alt_names.append(x509.IPAddress(address))
        elif _DNS_NAME.match(host):
            alt_names.append(x509.DNSName(host.lower()))
        else:
            raise TlsError(f"--host {host!r} is neither an IP address nor a DNS name")
    ca_key_path, ca_cert_path = directory / CA_KEY, directory / CA_CERT
    try:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    except OSError as error:
        raise TlsError(f"cannot read the lab CA in {directory} ({error.strerror or error}); make it with: "
                       f"tsotsa tls init {directory}") from None
    except ValueError as error:
        raise TlsError(f"the lab CA in {directory} is not a PEM key and certificate ({error})") from None
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    _refuse_existing(key_path, cert_path)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=MACHINE_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_agreement=True,
                                     content_commitment=False, data_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(directory, key_path, _key_pem(key), secret=True)
    _write(directory, cert_path, _cert_pem(cert), secret=False)
    return key_path, cert_path


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise TlsError(f"{path} already exists; refusing to overwrite it")


def _write(directory: Path, path: Path, data: bytes, secret: bool) -> None:
    """Creates `path` (never replacing a file: O_EXCL), mode 0600 for a key, 0644 for a certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    except FileExistsError:
        raise TlsError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as error:
        raise TlsError(f"cannot write {path} ({error.strerror or error})") from None
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.chmod(path, 0o600 if secret else 0o644)  # the umask may have taken bits off


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)
