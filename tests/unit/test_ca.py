"""The instance CA: confdir, custom CA validation, and what the agent is given to trust.

Runs as any user: the confdir is handed to the current uid/gid, except in the test that
checks the hand-over to another user, which needs root.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pwd
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from panopticond import ca
from panopticond.ca import TRUST_ENV, CAInfo, confdir_for, export, prepare, remove_ephemeral
from panopticond.config import CASpec
from panopticond.errors import PanopticonError
from panopticond.plan import Names

ALL_TRUST_VARS = {
    "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO", "PIP_CERT", "DENO_CERT", "AWS_CA_BUNDLE", "CARGO_HTTP_CAINFO",
}
ME = (os.getuid(), os.getgid())


def make_ca(cn: str = "pnt test CA", kind: str = "ec"):
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else \
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def key_pem(key, password: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def cert_pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert) -> str:
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


@pytest.fixture
def names(tmp_path) -> Names:
    run, state = tmp_path / "run", tmp_path / "state"
    run.mkdir()
    state.mkdir()
    return dataclasses.replace(Names.of("pnt-ca"), run_dir=str(run), state_dir=str(state))


@pytest.fixture
def custom(tmp_path):
    """A custom CA on disk: (spec, cert)."""
    key, cert = make_ca()
    (tmp_path / "ca.crt").write_bytes(cert_pem(cert))
    (tmp_path / "ca.key").write_bytes(key_pem(key))
    spec = CASpec(mode="custom", cert=str(tmp_path / "ca.crt"), key=str(tmp_path / "ca.key"))
    return spec, cert


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- CAInfo ---------------------------------------------------------------------------------


def test_agent_env_has_every_variable():
    info = CAInfo(cert="/run/panopticon/x/ca.pem", bundle="/run/panopticon/x/ca-bundle.pem",
                  fingerprint="AA:BB")
    env = info.agent_env()
    assert set(env) == ALL_TRUST_VARS
    # Node adds to its own store, so it gets the CA alone; the rest replace theirs.
    assert env["NODE_EXTRA_CA_CERTS"] == info.cert
    for k in ALL_TRUST_VARS - {"NODE_EXTRA_CA_CERTS"}:
        assert env[k] == info.bundle, k
    assert set(TRUST_ENV) == ALL_TRUST_VARS - {"NODE_EXTRA_CA_CERTS"}


def test_agent_env_is_a_fresh_dict():
    info = CAInfo("/a", "/b", "AA")
    info.agent_env()["SSL_CERT_FILE"] = "/evil"
    assert info.agent_env()["SSL_CERT_FILE"] == "/b"


# --- confdir_for / prepare -------------------------------------------------------------------


def test_confdir_per_mode(names, custom):
    assert confdir_for(names, CASpec("persistent")) == os.path.join(names.state_dir, "ca")
    assert confdir_for(names, CASpec("ephemeral")) == os.path.join(names.run_dir, "ca")
    assert confdir_for(names, custom[0]) == os.path.join(names.run_dir, "ca")


def test_prepare_persistent_keeps_what_is_there(names):
    confdir = prepare(names, CASpec("persistent"), *ME)
    assert confdir == os.path.join(names.state_dir, "ca")
    assert mode(confdir) == 0o700
    keep = os.path.join(confdir, ca.CA_KEY_AND_CERT)
    with open(keep, "w") as f:
        f.write("the persistent CA")
    assert prepare(names, CASpec("persistent"), *ME) == confdir
    with open(keep) as f:
        assert f.read() == "the persistent CA"


def test_prepare_ephemeral_starts_empty(names):
    confdir = prepare(names, CASpec("ephemeral"), *ME)
    assert confdir == os.path.join(names.run_dir, "ca")
    with open(os.path.join(confdir, ca.CA_KEY_AND_CERT), "w") as f:
        f.write("the old CA")
    os.chmod(confdir, 0o755)
    assert prepare(names, CASpec("ephemeral"), *ME) == confdir
    assert os.listdir(confdir) == []
    assert mode(confdir) == 0o700


def test_prepare_creates_missing_parents(tmp_path):
    n = dataclasses.replace(Names.of("pnt-ca"), run_dir=str(tmp_path / "r" / "x"),
                            state_dir=str(tmp_path / "s" / "x"))
    assert os.path.isdir(prepare(n, CASpec("persistent"), *ME))
    assert os.path.isdir(prepare(n, CASpec("ephemeral"), *ME))


def test_prepare_custom_writes_key_and_cert(names, custom):
    spec, cert = custom
    confdir = prepare(names, spec, *ME)
    assert confdir == os.path.join(names.run_dir, "ca")
    path = os.path.join(confdir, ca.CA_KEY_AND_CERT)
    assert mode(confdir) == 0o700
    assert mode(path) == 0o600
    data = open(path, "rb").read()
    # mitmproxy's layout: the key, then the certificate.
    assert data.index(b"PRIVATE KEY-----") < data.index(b"-----BEGIN CERTIFICATE-----")
    loaded = x509.load_pem_x509_certificate(data[data.index(b"-----BEGIN CERTIFICATE-----"):])
    assert loaded == cert
    key = serialization.load_pem_private_key(data, password=None)
    assert key.public_key() == cert.public_key()


def test_prepare_custom_replaces_an_old_confdir(names, custom):
    spec, _ = custom
    confdir = prepare(names, spec, *ME)
    stale = os.path.join(confdir, "mitmproxy-ca-cert.pem")
    with open(stale, "w") as f:
        f.write("stale")
    prepare(names, spec, *ME)
    assert not os.path.exists(stale)


def test_custom_ca_is_loadable_by_mitmproxy(names, tmp_path):
    certs = pytest.importorskip("mitmproxy.certs")
    key, cert = make_ca(kind="rsa")
    (tmp_path / "r.crt").write_bytes(cert_pem(cert))
    (tmp_path / "r.key").write_bytes(key_pem(key))
    spec = CASpec(mode="custom", cert=str(tmp_path / "r.crt"), key=str(tmp_path / "r.key"))
    confdir = prepare(names, spec, *ME)
    store = certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    assert store.default_ca.fingerprint() == cert.fingerprint(hashes.SHA256())


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the confdir to another user needs root")
def test_prepare_hands_the_confdir_to_the_proxy_user(names, custom):
    nobody = pwd.getpwnam("nobody")
    confdir = prepare(names, custom[0], nobody.pw_uid, nobody.pw_gid)
    for p in (confdir, os.path.join(confdir, ca.CA_KEY_AND_CERT)):
        st = os.lstat(p)
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)


def test_create_if_missing_makes_one_ca_mitmproxy_loads_and_keeps_it(names):
    certs = pytest.importorskip("mitmproxy.certs")
    confdir = prepare(names, CASpec(mode="ephemeral"), *ME)
    assert ca.create_if_missing(confdir, *ME)
    key_file = os.path.join(confdir, ca.CA_KEY_AND_CERT)
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    before = open(key_file, "rb").read()
    # A second call (a restart, another worker) never replaces it.
    assert not ca.create_if_missing(confdir, *ME)
    assert open(key_file, "rb").read() == before
    store = certs.CertStore.from_store(confdir, "mitmproxy", 2048)  # loads, creates nothing
    assert open(key_file, "rb").read() == before
    info = export(names, confdir)
    assert info.fingerprint.replace(":", "").lower() == store.default_ca.fingerprint().hex()
    assert not [f for f in os.listdir(confdir) if f.endswith(".tmp")]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the CA to another user needs root")
def test_create_if_missing_gives_every_file_to_the_proxy_user(names):
    nobody = pwd.getpwnam("nobody")
    confdir = prepare(names, CASpec(mode="ephemeral"), nobody.pw_uid, nobody.pw_gid)
    ca.create_if_missing(confdir, nobody.pw_uid, nobody.pw_gid)
    for f in os.listdir(confdir):
        st = os.lstat(os.path.join(confdir, f))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
            nobody.pw_uid, nobody.pw_gid, 0o600), f


# --- custom CA validation ---------------------------------------------------------------------


def test_custom_key_of_another_certificate(names, tmp_path, custom):
    spec, _ = custom
    other, _ = make_ca("other")
    (tmp_path / "other.key").write_bytes(key_pem(other))
    bad = dataclasses.replace(spec, key=str(tmp_path / "other.key"))
    with pytest.raises(PanopticonError) as info:
        prepare(names, bad, *ME)
    assert "does not belong to the certificate" in info.value.message
    assert info.value.hint and "ca =" in info.value.hint
    assert not os.path.exists(os.path.join(confdir_for(names, bad), ca.CA_KEY_AND_CERT))


@pytest.mark.parametrize("which", ["cert", "key"])
def test_custom_missing_file(names, tmp_path, custom, which):
    spec = dataclasses.replace(custom[0], **{which: str(tmp_path / "missing.pem")})
    with pytest.raises(PanopticonError) as info:
        prepare(names, spec, *ME)
    assert "cannot read the custom CA" in info.value.message
    assert "missing.pem" in info.value.message
    assert info.value.hint


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_custom_unreadable_key(names, custom):
    spec, _ = custom
    os.chmod(spec.key, 0)
    with pytest.raises(PanopticonError, match="cannot read the custom CA"):
        prepare(names, spec, *ME)


def test_custom_directory_instead_of_a_file(names, tmp_path, custom):
    spec = dataclasses.replace(custom[0], key=str(tmp_path))
    with pytest.raises(PanopticonError, match="cannot read the custom CA"):
        prepare(names, spec, *ME)


@pytest.mark.parametrize("which", ["cert", "key", "swapped"])
def test_custom_not_pem(names, tmp_path, custom, which):
    spec, _ = custom
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a pem file\n")
    if which == "swapped":
        bad = dataclasses.replace(spec, cert=spec.key, key=spec.cert)
    else:
        bad = dataclasses.replace(spec, **{which: str(garbage)})
    with pytest.raises(PanopticonError) as info:
        prepare(names, bad, *ME)
    assert "not a PEM certificate and unencrypted PEM key" in info.value.message


def test_custom_encrypted_key(names, tmp_path, custom):
    spec, _ = custom
    key = serialization.load_pem_private_key(open(spec.key, "rb").read(), password=None)
    (tmp_path / "enc.key").write_bytes(key_pem(key, password=b"secret"))
    with pytest.raises(PanopticonError, match="unencrypted"):
        prepare(names, dataclasses.replace(spec, key=str(tmp_path / "enc.key")), *ME)


# --- export -------------------------------------------------------------------------------


def check_export(names, info: CAInfo, cert) -> None:
    pem = cert_pem(cert)
    assert info.cert == os.path.join(names.run_dir, "ca.pem")
    assert info.bundle == os.path.join(names.run_dir, "ca-bundle.pem")
    assert info.fingerprint == fingerprint(cert)
    assert len(info.fingerprint) == 32 * 3 - 1
    assert open(info.cert, "rb").read() == pem
    bundle = open(info.bundle, "rb").read()
    assert bundle.endswith(pem)
    sysb = ca.system_bundle()
    if sysb:
        system = open(sysb, "rb").read().rstrip(b"\n") + b"\n"
        assert bundle == system + pem
        loaded = x509.load_pem_x509_certificates(bundle)
        assert loaded[-1] == cert and len(loaded) > 1
    else:
        assert bundle == pem
    sha = open(os.path.join(names.run_dir, "ca.sha256")).read()
    assert sha == info.fingerprint + "\n"
    for name in ("ca.pem", "ca-bundle.pem", "ca.sha256"):
        assert mode(os.path.join(names.run_dir, name)) == 0o644
    # Written through a temporary file, which is gone.
    assert not [f for f in os.listdir(names.run_dir) if f.endswith(".tmp")]
    # No key material is ever published.
    for name in ("ca.pem", "ca-bundle.pem"):
        assert b"PRIVATE KEY" not in open(os.path.join(names.run_dir, name), "rb").read()


def test_export_custom(names, custom):
    spec, cert = custom
    confdir = prepare(names, spec, *ME)
    info = export(names, confdir)
    check_export(names, info, cert)
    assert info.agent_env()["SSL_CERT_FILE"] == info.bundle


def test_export_mitmproxy_generated(names):
    certs = pytest.importorskip("mitmproxy.certs")
    confdir = prepare(names, CASpec("ephemeral"), *ME)
    store = certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    assert os.path.exists(os.path.join(confdir, ca.CA_CERT))
    info = export(names, confdir)
    check_export(names, info, x509.load_pem_x509_certificate(store.default_ca.to_pem()))


def test_export_prefers_the_certificate_file(names, custom, tmp_path):
    spec, cert = custom
    confdir = prepare(names, spec, *ME)
    _, other = make_ca("other")
    with open(os.path.join(confdir, ca.CA_CERT), "wb") as f:
        f.write(cert_pem(other))
    check_export(names, export(names, confdir), other)


def test_export_overwrites_and_is_idempotent(names, custom):
    spec, cert = custom
    confdir = prepare(names, spec, *ME)
    with open(os.path.join(names.run_dir, "ca.pem"), "w") as f:
        f.write("old")
    os.chmod(os.path.join(names.run_dir, "ca.pem"), 0o600)
    first = export(names, confdir)
    assert export(names, confdir) == first
    check_export(names, first, cert)


# --- upstream_bundle / remove_ephemeral -------------------------------------------------------


def test_upstream_bundle(names, tmp_path):
    assert ca.upstream_bundle(names, "") is None
    _, cert = make_ca("corporate")
    (tmp_path / "corp.pem").write_bytes(cert_pem(cert))
    path = ca.upstream_bundle(names, str(tmp_path / "corp.pem"))
    assert path == os.path.join(names.run_dir, "upstream-ca.pem")
    data = open(path, "rb").read()
    assert data.endswith(cert_pem(cert))
    assert mode(path) == 0o644
    with pytest.raises(PanopticonError, match="cannot read upstream_ca") as info:
        ca.upstream_bundle(names, str(tmp_path / "missing.pem"))
    assert "upstream_ca" in info.value.hint


def test_remove_ephemeral(names, custom):
    eph = prepare(names, CASpec("ephemeral"), *ME)
    remove_ephemeral(names, CASpec("ephemeral"))
    assert not os.path.exists(eph)
    remove_ephemeral(names, CASpec("ephemeral"))  # idempotent
    cust = prepare(names, custom[0], *ME)
    remove_ephemeral(names, custom[0])
    assert not os.path.exists(cust)
    pers = prepare(names, CASpec("persistent"), *ME)
    remove_ephemeral(names, CASpec("persistent"))
    assert os.path.isdir(pers)
