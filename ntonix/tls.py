"""TLS contexts for the HTTPS listener: TLS 1.2 minimum, modern ciphers, SNI by host name.

One ``SSLContext`` per certificate. The default context's ``sni_callback`` swaps in the
context whose name matches the client's server_name: exact names first, then the longest
``*.suffix`` wildcard (one label, as browsers match), else the default certificate.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from ntonix.config import ConfigError, SSLConfig

# Appended to every ``ssl.ciphers``: whatever an operator writes, these never get offered
# (issue 5: no NULL/RC4/3DES/export). TLS 1.3 suites are not affected by ``set_ciphers``
# and are all AEAD.
NEVER_CIPHERS = "!aNULL:!eNULL:!EXPORT:!RC4:!3DES:!DES:!MD5:!PSK:!SRP"


def _context(cert_file: str, key_file: str, ciphers: str, where: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.set_ciphers(f"{ciphers}:{NEVER_CIPHERS}")
    except ssl.SSLError:
        raise ConfigError(f"ssl.ciphers: no usable cipher in {ciphers!r}") from None
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: file not found: {exc.filename}") from None
    except PermissionError as exc:
        raise ConfigError(f"{where}: file not readable: {exc.filename}") from None
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}: certificate {cert_file} and key {key_file} do not load "
                          f"or do not match ({exc.reason or exc})") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


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
    default = _context(cfg.cert_file, cfg.key_file, cfg.ciphers, "ssl.cert_file/ssl.key_file")
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
