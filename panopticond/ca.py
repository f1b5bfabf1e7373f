"""The instance's CA: where mitmproxy keeps it, and what the agent is given to trust it.

Modes (config `ca`):
- persistent: the confdir is the instance's state directory; the CA survives restarts,
  so an agent that pinned it keeps working. Default for services.
- ephemeral: the confdir lives in the runtime directory; a new CA at every start, its
  key removed at teardown.
- custom: the operator's own certificate and key (e.g. one the agent's image already
  trusts) are copied into a fresh confdir at every start.

The key is readable by the proxy user only (confdir 0700, owned by it). mitmproxy itself
generates a missing CA when it starts, as the proxy user, so the key never exists with
another owner; except that the resident helper (helper.py) makes each ephemeral CA ahead
of its jail (an RSA key costs 50-150 ms of a start) and writes it there, 0600, owned by
the proxy user, before the proxy starts. The agent gets the public certificate alone (`ca.pem`) and a bundle of the
system CAs plus it (`ca-bundle.pem`), both in the runtime directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .config import CASpec
from .errors import PanopticonError
from .plan import Names

SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
)
# mitmproxy's file names inside its confdir (basename "mitmproxy").
CA_KEY_AND_CERT = "mitmproxy-ca.pem"
CA_CERT = "mitmproxy-ca-cert.pem"

# Variables through which common clients find extra trust anchors; each points at the
# bundle (system CAs + the instance CA), except Node's, which *adds* to its own store.
TRUST_ENV = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "DENO_CERT",
    "AWS_CA_BUNDLE",
    "CARGO_HTTP_CAINFO",
)


@dataclasses.dataclass(frozen=True)
class CAInfo:
    cert: str  # the instance CA alone
    bundle: str  # system CAs + the instance CA
    fingerprint: str  # SHA-256 of the DER certificate, colon-separated hex

    def agent_env(self) -> dict[str, str]:
        env = {k: self.bundle for k in TRUST_ENV}
        env["NODE_EXTRA_CA_CERTS"] = self.cert
        return env


def system_bundle() -> str | None:
    for p in SYSTEM_BUNDLES:
        if os.path.exists(p):
            return p
    return None


def confdir_for(names: Names, spec: CASpec) -> str:
    if spec.mode == "persistent":
        return os.path.join(names.state_dir, "ca")
    return os.path.join(names.run_dir, "ca")


def _read_custom(spec: CASpec) -> bytes:
    assert spec.cert and spec.key
    try:
        with open(spec.cert, "rb") as f:
            cert_pem = f.read()
        with open(spec.key, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise PanopticonError(
            f"cannot read the custom CA: {e.strerror}: {e.filename}",
            hint="check ca = { cert = ..., key = ... } in the config",
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:  # TypeError: the key is encrypted
        raise PanopticonError(
            f"the custom CA is not a PEM certificate and unencrypted PEM key ({e})",
            hint="check ca = { cert = ..., key = ... } in the config",
        ) from None
    pub = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if pub != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise PanopticonError(
            f"the custom CA key {spec.key} does not belong to the certificate {spec.cert}",
            hint="check ca = { cert = ..., key = ... } in the config",
        )
    return key_pem.rstrip(b"\n") + b"\n" + cert_pem


@dataclasses.dataclass(frozen=True)
class EphemeralCA:
    """A CA made ahead of its jail by the resident helper (helper.py)."""

    key_and_cert: bytes  # PEM, as mitmproxy writes mitmproxy-ca.pem
    cert: bytes  # PEM
    private_key: object  # the objects, so that the forked proxy need not load them
    certificate: object


def new_ephemeral() -> EphemeralCA:
    """A new CA as mitmproxy makes one (`CertStore.create_store`)."""
    from mitmproxy import certs, options

    key, cert = certs.create_ca(organization="mitmproxy", cn="mitmproxy",
                                key_size=options.KEY_SIZE)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return EphemeralCA(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption()) + pem, pem, key, cert)


def prepare(names: Names, spec: CASpec, proxy_uid: int, proxy_gid: int,
            ephemeral: EphemeralCA | None = None) -> str:
    """Create the proxy's confdir (0700, owned by the proxy user); return its path.
    `ephemeral`: a CA made ahead (`new_ephemeral`) for an ephemeral confdir."""
    confdir = confdir_for(names, spec)
    parent = os.path.dirname(confdir)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    if spec.mode != "persistent" and os.path.exists(confdir):
        shutil.rmtree(confdir)
    os.makedirs(confdir, mode=0o700, exist_ok=True)
    os.chown(confdir, proxy_uid, proxy_gid)
    os.chmod(confdir, 0o700)
    if spec.mode == "custom":
        combined = _read_custom(spec)
        path = os.path.join(confdir, CA_KEY_AND_CERT)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(combined)
        os.chown(path, proxy_uid, proxy_gid)
    elif spec.mode == "ephemeral" and ephemeral is not None:
        write_ephemeral(confdir, ephemeral, (proxy_uid, proxy_gid))
    return confdir


def write_ephemeral(confdir: str, ephemeral: EphemeralCA,
                    owner: tuple[int, int] | None = None) -> None:
    """Write a CA made ahead into a fresh confdir, 0600 (root: then chowned to `owner`;
    the prestarted proxy writes it as the proxy user itself). Refuses to overwrite."""
    from mitmproxy import certs

    # mitmproxy's default DH parameters, which it would write as it loads the CA.
    for name, data in (("mitmproxy-dhparam.pem", certs.DEFAULT_DHPARAM),
                       (CA_KEY_AND_CERT, ephemeral.key_and_cert), (CA_CERT, ephemeral.cert)):
        fd = os.open(os.path.join(confdir, name),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def create_if_missing(confdir: str, proxy_uid: int, proxy_gid: int) -> bool:
    """Generate the CA in `confdir` now, as mitmproxy would at its start, unless one is
    there. True if it was created.

    With several proxy workers, each would otherwise generate its own when they start
    together, and the agent would trust only one of them. mitmproxy's own generator
    makes the key and certificate; every file is created 0600 and given to the proxy user
    before a byte is written, so the key never exists with another owner.
    """
    key_path = os.path.join(confdir, CA_KEY_AND_CERT)
    if os.path.exists(key_path):
        return False
    from mitmproxy import certs  # ~0.1 s: only with several workers and no CA yet
    from mitmproxy.options import KEY_SIZE  # the proxy's key_size, left at its default
    key, cert = certs.create_ca(organization="mitmproxy", cn="mitmproxy", key_size=KEY_SIZE)
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    pem_key = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    # The other files mitmproxy writes with its CA are for people installing it by hand;
    # it reads only these (and uses its own DH parameters without the dhparam file).
    files = [(CA_CERT, pem_cert), ("mitmproxy-ca-cert.cer", pem_cert), ("mitmproxy-dhparam.pem",
             certs.DEFAULT_DHPARAM), (CA_KEY_AND_CERT, pem_key + pem_cert)]
    for name, data in files:  # the key last: its presence means a complete CA
        path = os.path.join(confdir, name)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchown(fd, proxy_uid, proxy_gid)
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    return True


def export(names: Names, confdir: str) -> CAInfo:
    """After the proxy is ready: publish the certificate and the bundle for the agent."""
    src = os.path.join(confdir, CA_CERT)
    if not os.path.exists(src):
        # A custom CA is written as key+cert only; extract the certificate.
        with open(os.path.join(confdir, CA_KEY_AND_CERT), "rb") as f:
            data = f.read()
        cert = x509.load_pem_x509_certificate(data[data.index(b"-----BEGIN CERTIFICATE-----"):])
    else:
        with open(src, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    fp = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    fingerprint = ":".join(fp[i : i + 2] for i in range(0, len(fp), 2))

    cert_path = os.path.join(names.run_dir, "ca.pem")
    bundle_path = os.path.join(names.run_dir, "ca-bundle.pem")
    _write_public(cert_path, pem)
    bundle = b""
    sysb = system_bundle()
    if sysb:
        with open(sysb, "rb") as f:
            bundle = f.read().rstrip(b"\n") + b"\n"
    _write_public(bundle_path, bundle + pem)
    _write_public(os.path.join(names.run_dir, "ca.sha256"), (fingerprint + "\n").encode())
    return CAInfo(cert_path, bundle_path, fingerprint)


def upstream_bundle(names: Names, extra: str) -> str | None:
    """The proxy's trust store for upstream TLS: the system CAs plus the operator's extra
    bundle (`[network] upstream_ca`). None: mitmproxy's default (certifi)."""
    if not extra:
        return None
    try:
        with open(extra, "rb") as f:
            extra_pem = f.read()
    except OSError as e:
        raise PanopticonError(
            f"cannot read upstream_ca {extra}: {e.strerror}",
            hint="fix [network] upstream_ca in the config",
        ) from None
    data = b""
    sysb = system_bundle()
    if sysb:
        with open(sysb, "rb") as f:
            data = f.read().rstrip(b"\n") + b"\n"
    path = os.path.join(names.run_dir, "upstream-ca.pem")
    _write_public(path, data + extra_pem)
    return path


def _write_public(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def remove_ephemeral(names: Names, spec: CASpec) -> None:
    """Idempotent. The persistent CA stays; any other confdir goes with its key."""
    if spec.mode != "persistent":
        shutil.rmtree(confdir_for(names, spec), ignore_errors=True)
