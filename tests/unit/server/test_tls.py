"""ntonix.server.tls: SNI matching and the server context, with trustme certificates.

Handshakes run in memory (two ``SSLObject``s joined by ``MemoryBIO``s), so the SNI callback,
the protocol floor and the cipher list are checked for real without any socket.
"""

from __future__ import annotations

import ssl
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import pytest
import trustme

from ntonix.config import ConfigError, SniEntry, SSLConfig
from ntonix.server.tls import NEVER_CIPHERS, build_server_context, match_sni
from tests.live.servers import write_cert

# ----------------------------------------------------------------------------- match_sni

A, B, WILD_B, WILD_C = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) for _ in range(4))
BY_NAME: Mapping[str, ssl.SSLContext] = {"a.test": A, "b.test": B, "*.b.test": WILD_B, "*.c.test": WILD_C}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.test", A),
        ("A.Test", A),  # host names are case-insensitive
        ("a.test.", A),  # a fully qualified name with its root dot
        ("b.test", B),  # exact beats the wildcard of the parent
        ("x.b.test", WILD_B),
        ("X-1.B.TEST", WILD_B),
        ("x.c.test", WILD_C),
        ("c.test", None),  # *.c.test does not cover c.test itself
        ("y.x.b.test", None),  # a wildcard covers one label only
        (".b.test", None),  # an empty label is not a label
        ("other.test", None),
        ("test", None),
        ("", None),
    ],
)
def test_match_sni(name: str, expected: ssl.SSLContext | None) -> None:
    assert match_sni(name, BY_NAME) is expected


def test_match_sni_without_entries() -> None:
    assert match_sni("a.test", {}) is None


# ----------------------------------------------------------------------------- contexts


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("certs")
    return {
        "default": write_cert(ca, folder, "default", "localhost", "127.0.0.1"),
        "a": write_cert(ca, folder, "a", "a.test"),
        "wild": write_cert(ca, folder, "wild", "*.b.test"),
    }


def _config(certs: dict[str, tuple[Path, Path]], sni: dict[str, str] | None = None,
            ciphers: str = SSLConfig().ciphers) -> SSLConfig:
    crt, key = certs["default"]
    entries = {name: SniEntry(str(certs[stem][0]), str(certs[stem][1])) for name, stem in (sni or {}).items()}
    return SSLConfig(cert_file=str(crt), key_file=str(key), sni=entries, ciphers=ciphers)


def _client(ca: trustme.CA, versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    ctx.check_hostname = False  # the SAN is what the tests look at
    if versions is not None:
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version, ctx.maximum_version = versions
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # else OpenSSL 3 will not even offer TLS 1.0/1.1
    return ctx


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_name: str | None) -> ssl.SSLObject:
    """A full handshake in memory; returns the client side (raises the first SSLError)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done: set[str] = set()
    for _ in range(20):
        for side, obj in (("client", client), ("server", server)):
            if side in done:
                continue
            try:
                obj.do_handshake()
                done.add(side)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == {"client", "server"}:
            return client
    raise AssertionError("handshake did not finish")


def _san(obj: ssl.SSLObject) -> list[str]:
    cert = obj.getpeercert()
    assert cert
    sans = cast("tuple[tuple[str, str], ...]", cert["subjectAltName"])
    return [value for kind, value in sans if kind == "DNS"]


def test_default_context_settings(certs: dict[str, tuple[Path, Path]]) -> None:
    ctx = build_server_context(_config(certs))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.sni_callback is None  # nothing to choose between


@pytest.mark.parametrize("ciphers", [SSLConfig().ciphers, "ALL:@SECLEVEL=0", "ALL:eNULL:RC4:3DES:EXP"])
def test_no_weak_cipher_is_ever_offered(certs: dict[str, tuple[Path, Path]], ciphers: str) -> None:
    ctx = build_server_context(_config(certs, ciphers=ciphers))
    names = [c["name"] for c in ctx.get_ciphers()]
    assert names
    for bad in ("NULL", "RC4", "DES", "EXP", "MD5", "PSK", "SRP", "ADH", "AECDH"):
        assert not [n for n in names if bad in n], (bad, names)
    assert "!RC4" in NEVER_CIPHERS


def test_default_ciphers_are_forward_secret_aead(certs: dict[str, tuple[Path, Path]]) -> None:
    ctx = build_server_context(_config(certs))
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert all(n.startswith(("ECDHE-", "DHE-")) and ("GCM" in n or "CHACHA20" in n) for n in tls12), tls12


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls12_and_tls13_handshake(ca: trustme.CA, certs: dict[str, tuple[Path, Path]],
                                   version: ssl.TLSVersion) -> None:
    client = _handshake(build_server_context(_config(certs)), _client(ca, (version, version)), "localhost")
    assert client.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert client.selected_alpn_protocol() is None  # the client offered none


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls10_and_tls11_refused(ca: trustme.CA, certs: dict[str, tuple[Path, Path]],
                                 version: ssl.TLSVersion) -> None:
    with pytest.raises(ssl.SSLError) as info:
        _handshake(build_server_context(_config(certs)), _client(ca, (version, version)), "localhost")
    assert info.value.reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION")


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [("a.test", ["a.test"]), ("x.b.test", ["*.b.test"]), ("other.test", ["localhost"]), (None, ["localhost"]),
     ("y.x.b.test", ["localhost"])],
)
def test_sni_picks_the_certificate(ca: trustme.CA, certs: dict[str, tuple[Path, Path]],
                                   server_name: str | None, expected: list[str]) -> None:
    ctx = build_server_context(_config(certs, sni={"a.test": "a", "*.b.test": "wild"}))
    assert ctx.sni_callback is not None
    assert _san(_handshake(ctx, _client(ca), server_name)) == expected


def test_sni_contexts_keep_the_protocol_floor(ca: trustme.CA, certs: dict[str, tuple[Path, Path]]) -> None:
    # The version is fixed from the first context's settings, but a per-name context must not
    # be weaker in anything else either: it is built by the same function.
    ctx = build_server_context(_config(certs, sni={"a.test": "a"}))
    with pytest.raises(ssl.SSLError):
        _handshake(ctx, _client(ca, (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1)), "a.test")


def test_alpn_http11(ca: trustme.CA, certs: dict[str, tuple[Path, Path]]) -> None:
    client_ctx = _client(ca)
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    client = _handshake(build_server_context(_config(certs)), client_ctx, "localhost")
    assert client.selected_alpn_protocol() == "http/1.1"  # never h2: gunicorn's h2 is not in use


# ----------------------------------------------------------------------------- errors


def test_missing_certificate_names_the_key(certs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    cfg = SSLConfig(cert_file=str(tmp_path / "nope.crt"), key_file=str(certs["default"][1]))
    with pytest.raises(ConfigError, match=r"^ssl\.cert_file: file not found: .*/nope\.crt$"):
        build_server_context(cfg)


def test_unreadable_key_names_the_key(certs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    cfg = SSLConfig(cert_file=str(certs["default"][0]), key_file=str(tmp_path))  # a folder
    with pytest.raises(ConfigError, match=r"^ssl\.key_file: file not readable: "):
        build_server_context(cfg)


def test_mismatched_pair_names_the_key(certs: dict[str, tuple[Path, Path]]) -> None:
    cfg = SSLConfig(cert_file=str(certs["default"][0]), key_file=str(certs["a"][1]))
    with pytest.raises(ConfigError) as info:
        build_server_context(cfg)
    message = str(info.value)
    assert message.startswith("ssl.key_file: does not match the certificate in ssl.cert_file ")
    assert str(certs["default"][0]) in message and str(certs["a"][1]) in message
    assert "\n" not in message


def test_garbage_certificate(certs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^ssl\.cert_file: no PEM certificate in .*/junk\.crt$"):
        build_server_context(SSLConfig(cert_file=str(junk), key_file=str(certs["default"][1])))


def test_garbage_key(certs: dict[str, tuple[Path, Path]]) -> None:
    crt = str(certs["default"][0])  # a certificate where the key should be
    with pytest.raises(ConfigError, match=r"^ssl\.key_file: no PEM private key in .*/default\.crt$"):
        build_server_context(SSLConfig(cert_file=crt, key_file=crt))


def test_encrypted_key_is_refused_not_prompted_for(ca: trustme.CA, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    leaf = ca.issue_cert("localhost")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    (tmp_path / "enc.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "enc.crt"))
    with pytest.raises(ConfigError, match=r"^ssl\.key_file: encrypted private keys are not supported: "):
        build_server_context(SSLConfig(cert_file=str(tmp_path / "enc.crt"), key_file=str(tmp_path / "enc.key")))


def test_bad_sni_entry_names_the_host(certs: dict[str, tuple[Path, Path]]) -> None:
    cfg = _config(certs)
    bad = SSLConfig(cert_file=cfg.cert_file, key_file=cfg.key_file,
                    sni={"a.test": SniEntry(str(certs["a"][0]), str(certs["wild"][1]))})
    with pytest.raises(ConfigError, match=r"^ssl\.sni\['a\.test'\]\.key_file: does not match the certificate in "
                                          r"ssl\.sni\['a\.test'\]\.cert_file "):
        build_server_context(bad)


def test_no_usable_cipher(certs: dict[str, tuple[Path, Path]]) -> None:
    with pytest.raises(ConfigError, match=r"^ssl\.ciphers: no usable cipher in 'RC4'$"):
        build_server_context(_config(certs, ciphers="RC4"))
