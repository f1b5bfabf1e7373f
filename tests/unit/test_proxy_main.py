"""proxy_main.py: what can run without the proxy's namespace (no root)."""

from __future__ import annotations

import os

import pytest
from mitmproxy import certs

from panopticond import proxy_main


@pytest.fixture
def once():
    orig = certs.CertStore.__dict__["from_store"]
    proxy_main._load_ca_once()
    yield
    certs.CertStore.from_store = orig


def test_the_ca_is_loaded_once_while_its_files_are_unchanged(tmp_path, once):
    first = certs.CertStore.from_store(tmp_path, "mitmproxy", 2048)  # created here
    second = certs.CertStore.from_store(tmp_path, "mitmproxy", 2048)
    assert certs.CertStore.from_store(tmp_path, "mitmproxy", 2048) is second
    assert second.default_ca.fingerprint() == first.default_ca.fingerprint()
    # Any change to the files (another CA in place, say) is loaded again.
    os.utime(tmp_path / "mitmproxy-ca.pem", ns=(1, 1))
    assert certs.CertStore.from_store(tmp_path, "mitmproxy", 2048) is not second
    other = tmp_path / "other"
    assert certs.CertStore.from_store(other, "mitmproxy", 2048).default_ca.fingerprint() \
        != first.default_ca.fingerprint()
