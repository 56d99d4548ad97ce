"""identity.py: the data directory's key, token and TLS files, on real files."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from citynode.core.keys import SigningKey, seal_secret_key, unseal_secret_key
from citynode.errors import ConfigError, KeyFileError
from citynode.identity import (
    PASSPHRASE_ENV,
    Identity,
    cert_fingerprint,
    check_token,
    create_identity,
    fingerprint_hex,
    load_identity,
    make_tls_certificate,
)

HOSTS = ["localhost", "127.0.0.1", "::1", "citynode.jakarta.example"]
FAST_KDF = {"kdf_opslimit": 1, "kdf_memlimit": 8192}  # Argon2id minimums: tests stay fast


@pytest.fixture(autouse=True)
def _no_env_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


def _create(d: Path, passphrase: str | None = None) -> Identity:
    return create_identity(d, name="Jakarta", hosts=HOSTS, passphrase=passphrase, **FAST_KDF)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


SECRETS = ["node.key", "operator.token", "tls/key.pem"]


def test_create_then_load_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "data"
    made = _create(d)
    loaded = load_identity(d)
    assert loaded.node_id == made.node_id == made.key.node_id
    assert loaded.key.seed == made.key.seed
    assert loaded.token == made.token
    assert len(made.token) >= 43  # 32 random bytes, base64url
    assert loaded.cert_fingerprint == made.cert_fingerprint
    assert loaded.cert_pem == made.cert_pem == (d / "tls" / "cert.pem").read_bytes()
    assert loaded.cert_path == d / "tls" / "cert.pem"
    # As the client's docstring shows it: a directory given as a string.
    assert load_identity(str(d)).key.seed == made.key.seed
    assert loaded.key_path == d / "tls" / "key.pem"
    assert (d / "operator.token").read_text().strip() == made.token
    assert made.token not in repr(made)


def test_modes_are_tight_even_with_an_open_umask(tmp_path: Path) -> None:
    d = tmp_path / "data"
    old = os.umask(0)
    try:
        _create(d)
    finally:
        os.umask(old)
    assert _mode(d) == 0o700
    assert _mode(d / "tls") == 0o700
    for name in SECRETS:
        assert _mode(d / name) == 0o600, name
    assert _mode(d / "tls" / "cert.pem") == 0o644
    assert _mode(d / "node.next.key") == _mode(d / "recovery.key") == 0o600
    assert _mode(d / "keylog") == 0o644  # public: the id is its inception's digest
    assert sorted(p.name for p in d.rglob("*")) == sorted(
        ["node.key", "node.next.key", "recovery.key", "keylog", "operator.token", "tls",
         "cert.pem", "key.pem"]
    )  # no temp files left behind


def test_create_refuses_an_existing_key_and_leaves_it_alone(tmp_path: Path) -> None:
    d = tmp_path / "data"
    first = _create(d)
    before = (d / "node.key").read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        _create(d)
    assert (d / "node.key").read_bytes() == before
    assert load_identity(d).node_id == first.node_id
    assert load_identity(d).token == first.token


def test_create_after_an_interrupted_init_replaces_leftovers(tmp_path: Path) -> None:
    d = tmp_path / "data"
    (d / "tls").mkdir(parents=True)
    (d / "operator.token").write_text("stale\n")
    (d / "tls" / "cert.pem").write_text("stale")
    made = _create(d)
    assert load_identity(d).token == made.token != "stale"


@pytest.mark.parametrize("name", SECRETS)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o610])
def test_secret_file_open_to_others_is_refused(tmp_path: Path, name: str, mode: int) -> None:
    d = tmp_path / "data"
    _create(d)
    path = d / name
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_identity(d)
    assert f"run `chmod 600 {path}`" in str(info.value)
    path.chmod(0o600)
    load_identity(d)  # and the advice works


def test_public_certificate_may_be_world_readable(tmp_path: Path) -> None:
    d = tmp_path / "data"
    _create(d)
    (d / "tls" / "cert.pem").chmod(0o644)
    load_identity(d)


@pytest.mark.parametrize("name", [*SECRETS, "tls/cert.pem"])
def test_missing_file_says_to_run_init(tmp_path: Path, name: str) -> None:
    d = tmp_path / "data"
    _create(d)
    (d / name).unlink()
    with pytest.raises(KeyFileError) as info:
        load_identity(d)
    assert str(info.value) == f"{d / name} not found: run `citynode init -d {d}` first"


def test_passphrase_sealed_key(tmp_path: Path) -> None:
    d = tmp_path / "data"
    made = _create(d, passphrase="correct horse")
    text = (d / "node.key").read_bytes()
    assert b" argon2id 1 8192 " in text  # the test limits were passed through
    assert load_identity(d, "correct horse").key.seed == made.key.seed


def test_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "data"
    _create(d, passphrase="correct horse")
    with pytest.raises(KeyFileError, match=r"node\.key: wrong passphrase"):
        load_identity(d, "battery staple")


def test_sealed_key_without_passphrase_names_the_env_variable(tmp_path: Path) -> None:
    d = tmp_path / "data"
    _create(d, passphrase="correct horse")
    with pytest.raises(KeyFileError, match=PASSPHRASE_ENV):
        load_identity(d)


def test_passphrase_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "data"
    made = _create(d, passphrase="correct horse")
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    assert load_identity(d).node_id == made.node_id
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_identity(d)


def test_unsealed_key_file_is_plain(tmp_path: Path) -> None:
    d = tmp_path / "data"
    _create(d)
    assert (d / "node.key").read_bytes().startswith(b"citynode-secret-key-v1 plain ")


def test_corrupt_files_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "data"
    _create(d)
    (d / "operator.token").write_text("two words\n")
    with pytest.raises(KeyFileError, match=r"operator\.token is corrupt"):
        load_identity(d)
    (d / "operator.token").write_text("tok\n")
    (d / "node.key").write_text("not a key\n")
    with pytest.raises(KeyFileError, match=r"node\.key: key file is not a citynode"):
        load_identity(d)


def test_tls_key_that_is_not_the_certificates_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "data"
    _create(d)
    _, other_key = make_tls_certificate("Other", ["localhost"])
    (d / "tls" / "key.pem").write_bytes(other_key)
    with pytest.raises(KeyFileError, match="is not the key of"):
        load_identity(d)


def test_certificate_names_usage_and_validity(tmp_path: Path) -> None:
    made = _create(tmp_path / "data")
    cert = x509.load_pem_x509_certificate(made.cert_pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["Jakarta"]
    assert cert.issuer == cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "citynode.jakarta.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.value.ca is False and bc.critical
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.key_encipherment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    now = datetime.datetime.now(datetime.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert datetime.timedelta(minutes=59) <= now - start <= datetime.timedelta(minutes=61)
    assert end - start == datetime.timedelta(days=3650)
    tls_key = serialization.load_pem_private_key((tmp_path / "data/tls/key.pem").read_bytes(),
                                                 None)
    assert tls_key.public_key() == cert.public_key()


def test_fingerprint_is_sha256_of_der(tmp_path: Path) -> None:
    made = _create(tmp_path / "data")
    der = x509.load_pem_x509_certificate(made.cert_pem).public_bytes(serialization.Encoding.DER)
    assert made.cert_fingerprint == hashlib.sha256(der).digest()
    assert cert_fingerprint(der) == cert_fingerprint(made.cert_pem) == made.cert_fingerprint
    assert load_identity(tmp_path / "data").cert_fingerprint == hashlib.sha256(der).digest()
    hx = fingerprint_hex(made.cert_fingerprint)
    assert re.fullmatch(r"[0-9a-f]{64}", hx)
    assert bytes.fromhex(hx) == made.cert_fingerprint


def test_cert_fingerprint_rejects_a_bad_pem() -> None:
    with pytest.raises(KeyFileError):
        cert_fingerprint(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_check_token() -> None:
    assert check_token("s3cret-token", "s3cret-token")
    assert not check_token("s3cret-token", "s3cret-tokeN")
    assert not check_token("s3cret-token", "s3cret-token ")
    assert not check_token("s3cret-token", "")
    assert not check_token("s3cret-token", None)
    assert not check_token("", "")
    assert not check_token("s3cret-token", "s3cret-tokén")


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["-leading.example"], ["a..b"]])
def test_unusable_hosts_are_config_errors(hosts: list[str]) -> None:
    with pytest.raises(ConfigError):
        make_tls_certificate("Jakarta", hosts)


def test_unusable_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="64 bytes"):
        make_tls_certificate("é" * 33, ["localhost"])  # 66 bytes of UTF-8


def test_ssl_accepts_the_certificate_for_each_host(tmp_path: Path) -> None:
    """A real TLS handshake (in memory) against the certificate, by name and by IP."""
    made = _create(tmp_path / "data")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(made.cert_path, made.key_path)
    client = ssl.create_default_context(cadata=made.cert_pem.decode())
    for host in ["localhost", "127.0.0.1", "citynode.jakarta.example"]:
        _handshake(client, server, host)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(client, server, "elsewhere.example")


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, host: str) -> None:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=host)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, obj in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_seed_never_in_repr(tmp_path: Path) -> None:
    made = _create(tmp_path / "data")
    assert made.key.seed.hex() not in repr(made)
    assert isinstance(made.key, SigningKey)


def test_init_makes_a_cn2_identity_whose_recovery_material_recovers_it(tmp_path: Path) -> None:
    from citynode.core import keylog
    from citynode.core.keys import SigningKey, Verifier, parse_node_id, unseal_secret_key

    d = tmp_path / "data"
    made = _create(d)
    assert made.node_id.startswith("cn2") and len(made.node_id) == 59
    assert parse_node_id(made.node_id) == made.identity == made.key.identity
    state = keylog.verify_log(made.node_id, (d / "keylog").read_bytes(), verifier=Verifier())
    assert state.key == made.key.public_key  # K0 signs; the id is not a key
    assert made.identity != made.key.public_key
    assert made.recovery_path == d / "recovery.key"
    assert made.recovery_passphrase and made.recovery_phrase
    ident, seed = keylog.unseal_recovery(made.recovery_path.read_bytes(),
                                         made.recovery_passphrase)
    assert ident == made.identity
    assert keylog.parse_recovery_phrase(made.recovery_phrase) == seed
    assert keylog.commit_key(SigningKey(seed).public_key) == state.recovery
    # the next key on disk is the one the inception committed to, sealed with the
    # next-key passphrase (never on the machine): node.key alone cannot rotate; that
    # passphrase is not the recovery one (typed on the node, the recovery one never is)
    assert made.next_passphrase and made.next_passphrase != made.recovery_passphrase
    nxt = SigningKey(unseal_secret_key((d / "node.next.key").read_bytes(),
                                       made.next_passphrase))
    assert keylog.commit_key(nxt.public_key) == state.next
    for other in (None, made.recovery_passphrase):
        with pytest.raises(KeyFileError):
            unseal_secret_key((d / "node.next.key").read_bytes(), other)
    loaded = load_identity(d)
    assert loaded.node_id == made.node_id and loaded.key.log == made.key.log


def test_a_key_that_is_not_the_logs_key_in_force_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "data"
    made = _create(d)
    nxt = unseal_secret_key((d / "node.next.key").read_bytes(), made.next_passphrase)
    (d / "node.key").write_bytes(seal_secret_key(nxt, None))
    with pytest.raises(KeyFileError, match="not the key in force"):
        load_identity(d)


def test_tls_renewal_stages_then_switches_for_the_same_hosts(tmp_path: Path) -> None:
    from citynode.identity import stage_tls_renewal, switch_tls

    ident = _create(tmp_path)
    with pytest.raises(KeyFileError, match="no renewed certificate is staged"):
        switch_tls(tmp_path)
    nxt = stage_tls_renewal(tmp_path)
    assert nxt != ident.cert_fingerprint
    staged = load_identity(tmp_path)
    assert (staged.cert_fingerprint, staged.next_cert_fingerprint) == (
        ident.cert_fingerprint, nxt)
    assert _mode(tmp_path / "tls" / "next-key.pem") == 0o600
    with pytest.raises(KeyFileError, match="staged already"):
        stage_tls_renewal(tmp_path)
    new = x509.load_pem_x509_certificate((tmp_path / "tls" / "next-cert.pem").read_bytes())
    old = x509.load_pem_x509_certificate(ident.cert_pem)
    san = x509.SubjectAlternativeName
    assert new.extensions.get_extension_for_class(san).value == \
        old.extensions.get_extension_for_class(san).value
    assert new.subject == old.subject
    assert switch_tls(tmp_path) == nxt
    after = load_identity(tmp_path)
    assert (after.cert_fingerprint, after.next_cert_fingerprint) == (nxt, None)
    assert not (tmp_path / "tls" / "next-cert.pem").exists()


def test_a_tls_switch_cut_short_is_finished_at_load(tmp_path: Path) -> None:
    from citynode.identity import stage_tls_renewal

    _create(tmp_path)
    nxt = stage_tls_renewal(tmp_path)
    tls = tmp_path / "tls"
    os.replace(tls / "next-key.pem", tls / "key.pem")  # the switch's first rename only
    ident = load_identity(tmp_path)
    assert (ident.cert_fingerprint, ident.next_cert_fingerprint) == (nxt, None)


def test_a_rotation_keeps_the_retired_key_sealed_like_node_key(tmp_path: Path) -> None:
    from citynode.core import keylog
    from citynode.core.keys import Verifier
    from citynode.identity import read_next_key, write_key_change

    ident = _create(tmp_path, "pw")
    old = ident.key.public_key
    state = keylog.verify_log(ident.identity, ident.key.log or b"", verifier=Verifier())
    nxt, after = read_next_key(tmp_path, ident.next_passphrase), SigningKey.generate()
    ev = keylog.rotate(state, nxt, after.public_key, state.time + 1, {})
    wire = keylog.encode_log([*keylog.decode_log(ident.key.log or b""), ev.envelope])
    write_key_change(tmp_path, wire, nxt.seed, after.seed, "pw", ident.key.seed,
                     opslimit=1, memlimit=8192)
    path = tmp_path / "node.retired.key"
    assert _mode(path) == 0o600
    text = path.read_text()
    assert text.startswith("citynode-secret-key-v1 argon2id ") and " plain " not in text
    key = load_identity(tmp_path, "pw").key
    assert key.public_key == nxt.public_key
    assert [k.public_key for k in key.reading_keys()] == [nxt.public_key, old]


def test_switch_retires_the_key_in_force() -> None:
    from citynode.core.keys import NodeKey

    k = NodeKey(b"\x01" * 32, b"\x09" * 32, "cn2x", b"log0")
    old = k.public_key
    k.switch(b"\x02" * 32, b"log1")
    assert k.public_key == SigningKey(b"\x02" * 32).public_key
    assert [r.public_key for r in k.reading_keys()] == [k.public_key, old]
