"""The host's upstream resolvers, read from resolv.conf files."""

from __future__ import annotations

import os

import pytest

from panopticond import resolvers
from panopticond.errors import PanopticonError
from panopticond.resolvers import host_resolvers, parse

# --- parse ------------------------------------------------------------------------------------


def test_parse_plain():
    assert parse("nameserver 9.9.9.9\nnameserver 2620:fe::fe\n") == ["9.9.9.9", "2620:fe::fe"]


def test_parse_keeps_order_and_loopback():
    text = "nameserver 127.0.0.53\nnameserver 203.0.113.53\nnameserver ::1\n"
    assert parse(text) == ["127.0.0.53", "203.0.113.53", "::1"]


def test_parse_comments_and_other_options():
    text = """\
# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).
# nameserver 198.51.100.99
; nameserver 198.51.100.98
search example.internal
options edns0 trust-ad
domain example.internal
sortlist 130.155.160.0/255.255.240.0
nameserver 198.51.100.53 # trailing comment
nameserver\t203.0.113.53\t
   nameserver 203.0.113.54
nameserver 203.0.113.55#no space before the comment
"""
    assert parse(text) == ["198.51.100.53", "203.0.113.53", "203.0.113.54", "203.0.113.55"]


def test_parse_strips_scope_ids_and_canonicalises():
    text = "nameserver fe80::1%eth0\nnameserver 2001:DB8:0::53%2\nnameserver 2001:db8::0053\n"
    assert parse(text) == ["fe80::1", "2001:db8::53", "2001:db8::53"]


@pytest.mark.parametrize(
    "line",
    [
        "nameserver",
        "nameserver ",
        "nameserver dns.example.com",
        "nameserver 203.0.113.300",
        "nameserver 203.0.113.53:53",
        "nameserver [2001:db8::53]",
        "nameserver 2001:db8::zz",
        "nameserver %eth0",
        "Nameserver 203.0.113.53",
        "nameservers 203.0.113.53",
        "#nameserver 203.0.113.53",
        "xnameserver 203.0.113.53",
        "\x00\xff garbage",
        "",
    ],
)
def test_parse_skips_junk(line):
    assert parse(line + "\nnameserver 198.51.100.1\n") == ["198.51.100.1"]


def test_parse_empty():
    assert parse("") == []
    assert parse("\n\n# nothing\n") == []


# --- host_resolvers ---------------------------------------------------------------------------


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_first_file_with_usable_servers_wins(tmp_path):
    a = write(tmp_path / "a", "nameserver 198.51.100.53\nnameserver 127.0.0.1\n")
    b = write(tmp_path / "b", "nameserver 203.0.113.53\n")
    assert host_resolvers((a, b)) == ["198.51.100.53"]


def test_loopback_only_falls_through_to_the_second_file(tmp_path):
    stub = write(tmp_path / "resolv.conf",
                 "# systemd-resolved stub\nnameserver 127.0.0.53\noptions edns0 trust-ad\n")
    upstream = write(tmp_path / "upstream.conf",
                     "nameserver 198.51.100.53\nnameserver 2001:db8::53\nnameserver ::1\n")
    assert host_resolvers((stub, upstream)) == ["198.51.100.53", "2001:db8::53"]


def test_missing_or_unreadable_file_is_skipped(tmp_path):
    upstream = write(tmp_path / "upstream.conf", "nameserver 198.51.100.53\n")
    assert host_resolvers((str(tmp_path / "missing"), upstream)) == ["198.51.100.53"]
    # A directory in place of the file: also skipped.
    assert host_resolvers((str(tmp_path), upstream)) == ["198.51.100.53"]


def test_none_usable_raises_with_hint(tmp_path):
    a = write(tmp_path / "a", "nameserver 127.0.0.53\nnameserver ::1\n")
    b = write(tmp_path / "b", "# empty\n")
    for paths in ((a, b), (a,), (str(tmp_path / "missing"),), ()):
        with pytest.raises(PanopticonError) as info:
            host_resolvers(paths)
        e = info.value
        assert "no usable upstream DNS server" in e.message
        assert e.hint and "dns_servers" in e.hint


def test_default_paths():
    assert resolvers.RESOLV_CONF == "/etc/resolv.conf"
    assert resolvers.RESOLVED_UPSTREAM == "/run/systemd/resolve/resolv.conf"
    assert host_resolvers.__defaults__ == ((resolvers.RESOLV_CONF, resolvers.RESOLVED_UPSTREAM),)


@pytest.mark.parametrize("server", ["fe80::1%eth0", "0.0.0.0", "::"])
def test_unreachable_from_the_jail_falls_through(tmp_path, server):
    a = write(tmp_path / "a", f"nameserver {server}\n")
    b = write(tmp_path / "b", "nameserver 198.51.100.53\n")
    assert host_resolvers((a, b)) == ["198.51.100.53"]


def test_non_utf8_file_does_not_crash(tmp_path):
    a = tmp_path / "a"
    a.write_bytes(b"# caf\xe9\nnameserver 198.51.100.53\n")
    assert host_resolvers((str(a),)) == ["198.51.100.53"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_permission_denied_is_skipped(tmp_path):
    a = write(tmp_path / "a", "nameserver 198.51.100.1\n")
    os.chmod(a, 0)
    b = write(tmp_path / "b", "nameserver 198.51.100.53\n")
    assert host_resolvers((a, b)) == ["198.51.100.53"]
