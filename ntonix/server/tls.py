"""TLS contexts for the HTTPS listener: TLS 1.2 minimum, modern ciphers, SNI by host name.

One ``SSLContext`` per certificate. The default context's ``sni_callback`` swaps in the
context whose name matches the client's server_name: the exact name first, then the
``*.parent`` wildcard (covering one label, as browsers match), else the default certificate.
Errors name the config key that is wrong (``ssl.key_file: does not match ...``).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from ntonix.config import ConfigError, SSLConfig

# Appended to every ``ssl.ciphers``: whatever an operator writes, these never get offered
# (never: NULL/RC4/3DES/export). TLS 1.3 suites are not affected by ``set_ciphers``
# and are all AEAD.
NEVER_CIPHERS = "!aNULL:!eNULL:!EXPORT:!RC4:!3DES:!DES:!MD5:!PSK:!SRP"


def _context(cert_file: str, key_file: str, ciphers: str, where: str) -> ssl.SSLContext:
    """One certificate's context; ``where`` is the config prefix (``ssl``, ``ssl.sni['a.test']``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.set_ciphers(f"{ciphers}:{NEVER_CIPHERS}")
    except ssl.SSLError:
        raise ConfigError(f"ssl.ciphers: no usable cipher in {ciphers!r}") from None
    _load_pair(ctx, cert_file, key_file, where)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _load_pair(ctx: ssl.SSLContext, cert_file: str, key_file: str, where: str) -> None:
    """``load_cert_chain``, with an error that names the one key (and file) that is wrong."""
    cert_key, key_key = f"{where}.cert_file", f"{where}.key_file"
    for name, path in ((cert_key, cert_file), (key_key, key_file)):
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            raise ConfigError(f"{name}: file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"{name}: file not readable: {path} ({exc.strerror})") from None

    def no_password() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal and the master would hang.
        raise ConfigError(f"{key_key}: encrypted private keys are not supported: {key_file}")

    try:
        ctx.load_cert_chain(cert_file, key_file, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{key_key}: does not match the certificate in {cert_key} "
                              f"({key_file} vs {cert_file})") from None
        try:  # which of the two does not load? (OpenSSL says only "PEM lib")
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert_file)
        except ssl.SSLError:
            raise ConfigError(f"{cert_key}: no PEM certificate in {cert_file}") from None
        raise ConfigError(f"{key_key}: no PEM private key in {key_file}") from None


def match_sni(name: str, contexts: Mapping[str, ssl.SSLContext]) -> ssl.SSLContext | None:
    """The context for ``name``: exact match, else a ``*.`` wildcard covering one label."""
    name = name.lower().rstrip(".")
    exact = contexts.get(name)
    if exact is not None:
        return exact
    label, _, parent = name.partition(".")
    return contexts.get(f"*.{parent}") if label and parent else None


def build_server_context(cfg: SSLConfig) -> ssl.SSLContext:
    """The listener's context; raises ConfigError naming the file that is wrong."""
    default = _context(cfg.cert_file, cfg.key_file, cfg.ciphers, "ssl")
    by_name = {name: _context(e.cert_file, e.key_file, cfg.ciphers, f"ssl.sni[{name!r}]")
               for name, e in cfg.sni.items()}
    if by_name:
        def pick(sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext) -> None:
            if server_name:
                chosen = match_sni(server_name, by_name)
                if chosen is not None:
                    sock.context = chosen
            return None

        default.sni_callback = pick
    return default
