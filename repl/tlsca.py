"""Making the cluster's CA and its node certificates (``replfs tls init``, ``replfs tls
issue``), and reading one to say why a daemon refuses it.

This is the one module that loads ``cryptography``. A daemon checks its own
credentials and runs its links with the standard library's ``ssl``
(repl/tls.py), and comes here only to explain a refusal: it never keeps
this library (about 10 MiB of its memory) for a check that passed.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from repl.errors import UsageError
from repl.tls import CA, DEFAULT_DAYS, check_name
from store.private import private_dir, write_private

CA_DAYS = 36500  # the CA outlives every certificate it will sign
# A certificate made now is valid from a little before now, so a peer whose
# clock is a few minutes behind still accepts it.
BACKDATE = datetime.timedelta(hours=1)


def init_ca(directory: Path) -> Path:
    """Make the cluster's CA in *directory* (0700): ca.pem and ca.key (0600).

    Returns the path of ca.pem. Raises UsageError if *directory* holds a CA
    already (it is never replaced: every certificate it signed would stop
    being trusted), UnsafeState if another user could write to it.
    """
    private_dir(directory)
    cert_path, key_path = directory / f"{CA}.pem", directory / f"{CA}.key"
    if cert_path.exists() or key_path.exists():
        raise UsageError(f"{directory} holds a CA already ({cert_path}); it is kept as it is")
    os.chmod(directory, 0o700)  # it was ours already, perhaps readable by all: not any more
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         f"replfs cluster CA {os.urandom(4).hex()}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    write_private(key_path, _key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(directory: Path, name: str, *, days: int = DEFAULT_DAYS,
          valid_from: datetime.datetime | None = None) -> Path:
    """Make NAME.pem and NAME.key (0600) in *directory*, signed by its CA.

    *valid_from* (default: now, less BACKDATE) and *days* bound its validity.
    Returns the path of NAME.pem. Raises UsageError if there is no CA or
    NAME has a certificate already (remove both files to issue a new one).
    """
    check_name(name)
    if days < 1:
        raise UsageError(f"a certificate must be valid for at least a day, not {days}")
    ca_cert_path, ca_key_path = directory / f"{CA}.pem", directory / f"{CA}.key"
    if not ca_key_path.exists() or not ca_cert_path.exists():
        raise UsageError(f"no CA in {directory}; make one with 'replfs tls init {directory}'")
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if cert_path.exists() or key_path.exists():
        raise UsageError(f"{name} has a certificate already ({cert_path}); remove "
                         f"{cert_path} and {key_path} to issue a new one")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{ca_key_path} is not a key that replfs tls init made")
    key = ec.generate_private_key(ec.SECP256R1())
    start = valid_from or datetime.datetime.now(datetime.UTC) - BACKDATE
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    write_private(key_path, _key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def names(cert: x509.Certificate) -> set[str]:
    """The DNS names a certificate carries."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return set(san.value.get_values_for_type(x509.DNSName))


def refused(prefix: Path, ca: Path, cert: Path, key: Path, failure: BaseException) -> str:
    """Why the credentials at *prefix* (DIR/NAME) failed their check, in one line:
    *failure* is what the check raised (repl/tls.py ``credentials``)."""
    directory, name = prefix.parent, prefix.name
    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError as exc:
        return f"--tls {prefix}: {cert} is not a certificate ({exc})"
    now = datetime.datetime.now(datetime.UTC)
    if parsed.not_valid_after_utc < now:
        return (f"{cert} expired on {parsed.not_valid_after_utc:%Y-%m-%d}; remove it and "
                f"{key}, then issue a new one with 'replfs tls issue {directory} {name}'")
    if parsed.not_valid_before_utc > now:
        return (f"{cert} is not valid until {parsed.not_valid_before_utc:%Y-%m-%d %H:%M} "
                "UTC; check this host's clock")
    if name not in names(parsed):
        return f"{cert} names {sorted(names(parsed))}, not {name!r}"
    return f"--tls {prefix}: {cert}, {key} and {ca} do not go together ({failure})"
