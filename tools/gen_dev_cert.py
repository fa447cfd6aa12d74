"""Write a self-signed development certificate for localhost.

    python scripts/gen_dev_cert.py [--out-dir conf] [--force] [--days 365]

Writes ``<out-dir>/server.crt`` and ``<out-dir>/server.key`` (mode 0600), the names the seed
configuration ``conf/ntonix.json`` uses, valid for ``localhost``, ``127.0.0.1`` and ``::1``.
Nothing is written when both files already exist, unless ``--force``.

The certificate is its own issuer, so clients trust it directly:
``curl --cacert conf/server.crt https://localhost:8443/health``. For development only.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent
DNS_NAMES = ("localhost",)
IP_ADDRESSES = ("127.0.0.1", "::1")


def make_certificate(days: int) -> tuple[bytes, bytes]:
    """A fresh RSA key and a self-signed certificate for it, both PEM-encoded."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "NTONIX development certificate"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in DNS_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in IP_ADDRESSES]
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    # Shaped like `openssl req -x509`: a self-issued certificate that may act as its own trust
    # anchor (CA:TRUE, keyCertSign, key identifiers), so --cacert / verify=... accept it even
    # under OpenSSL's strict X.509 checks (Python 3.13+ default), and usable as a TLS server
    # certificate (serverAuth, SANs: clients ignore the CN).
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the start (the key is never world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)  # in case the umask took bits away
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a self-signed development certificate for localhost.")
    parser.add_argument(
        "--out-dir", default=str(ROOT / "conf"), help="folder for server.crt and server.key (default: conf)"
    )
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    args = parser.parse_args(argv)

    out = Path(args.out_dir)
    crt, key = out / "server.crt", out / "server.key"
    if crt.exists() and key.exists() and not args.force:
        print(f"dev certificate present: {crt} and {key} (use --force to replace)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = make_certificate(args.days)
    _write(key, key_pem, 0o600)
    _write(crt, cert_pem, 0o644)
    names = ", ".join((*DNS_NAMES, *IP_ADDRESSES))
    print(f"wrote self-signed development certificate {crt} and key {key} for {names}, valid {args.days} days")
    return 0


if __name__ == "__main__":
    sys.exit(main())
