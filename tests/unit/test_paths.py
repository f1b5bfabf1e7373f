"""Request paths and path patterns: readings, prefix escapes, pattern syntax."""

from __future__ import annotations

import posixpath
import re
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from panopticond.paths import PathPattern, RequestPath

ACME = PathPattern.parse("/repos/acme/*")


@pytest.mark.parametrize(("target", "path"), [
    ("/", "/"),
    ("/repos/acme/x", "/repos/acme/x"),
    ("/repos/acme/x?y=../../other#frag", "/repos/acme/x"),
    ("/repos//acme///x", "/repos/acme/x"),
    ("/repos/acme/x/", "/repos/acme/x/"),
    ("/repos/acme/./x", "/repos/acme/x"),
    ("/repos/acme/x/..", "/repos/acme/"),
    ("/../../etc", "/etc"),
    ("/a%20b/%C3%A9", "/a b/é"),
    ("/api/v4/projects/acme%2Frepo", "/api/v4/projects/acme/repo"),
])
def test_canonical_reading(target, path):
    assert RequestPath.of(target).path == path


@pytest.mark.parametrize("target", [
    "", "*", "https://x.test/repos/acme/x", "repos/acme/x",
    "/repos/acme/%252e%252e/x",  # double encoding
    "/repos/acme/%zz", "/repos/acme/%", "/repos/acme/%ff",  # bad escape, bad UTF-8
    "/repos/acme\\..\\other", "/repos/acme/%5c", "/repos/acme/%00", "/repos/acme/\t",
])
def test_no_reading(target):
    rp = RequestPath.of(target)
    assert rp.path is None and not rp.readings
    assert not PathPattern.parse("/*").matches(rp)


@pytest.mark.parametrize(("target", "allowed"), [
    ("/repos/acme", True),
    ("/repos/acme/", True),
    ("/repos/acme/x/y/z", True),
    ("/repos/acme/x?redirect=/repos/other", True),
    ("/repos/acme/x/../y", True),
    ("/repos/acme//x", True),
    ("/repos//acme/x", False),  # not under the prefix to a server that keeps '//'
    ("/repos/acme%2Fx", True),
    ("/repos/acmex", False),
    ("/repos/other", False),
    ("/repos/Acme/x", False),
    ("/repos/acme/..", False),
    ("/repos/acme/../other", False),
    ("/repos/acme/%2e%2e/other", False),
    ("/repos/acme/%2E%2E%2Fother", False),
    ("/repos/acme/..%2Fother", False),
    ("/repos/acme%2F..%2F..%2Fother", False),
    ("/repos/acme//../other", False),
    ("/repos/other/../acme/x", False),  # a router that does not resolve dots sees "other"
    ("/repos/acme/%252e%252e/other", False),
    ("/repos/acme/..\\other", False),
])
def test_prefix_pattern(target, allowed):
    assert ACME.matches(RequestPath.of(target)) is allowed


def test_exact_and_inner_star_patterns():
    exact = PathPattern.parse("/user")
    assert exact.matches(RequestPath.of("/user?x=1"))
    assert not exact.matches(RequestPath.of("/user/"))
    assert not exact.matches(RequestPath.of("/users"))
    inner = PathPattern.parse("/repos/*/issues")
    assert inner.matches(RequestPath.of("/repos/acme/issues"))
    assert inner.matches(RequestPath.of("/repos/a/b/issues"))  # '*' crosses '/'
    assert not inner.matches(RequestPath.of("/repos/acme/issues/1"))
    assert PathPattern.parse("/*").matches(RequestPath.of("/"))
    assert PathPattern.parse("/v1/*.json").matches(RequestPath.of("/v1/a/b.json"))


def test_regex_characters_are_literal():
    p = PathPattern.parse("/a.b+(c)[d]$")
    assert p.matches(RequestPath.of("/a.b+(c)[d]$"))
    assert not p.matches(RequestPath.of("/aXb+(c)[d]$"))


@pytest.mark.parametrize(("text", "why"), [
    ("repos/*", "starts with '/'"),
    ("", "starts with '/'"),
    ("/a?b=1", "query"),
    ("/a#b", "query"),
    ("/a%20b", "decoded"),
    ("/a\\b", "backslash"),
    ("/a/../b", "'..'"),
    ("/a/./b", "'..'"),
    ("/a//b", "'//'"),
])
def test_pattern_syntax(text, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        PathPattern.parse(text)


# --- properties: no reading of an allowed path leaves the prefix ------------------------------

# Pieces that the escapes are made of, glued with slashes in every order.
PIECE = st.sampled_from([
    "repos", "acme", "other", "x", "", ".", "..", "%2e", "%2E%2e", "%2f", "%2F", "..%2f",
    "%2e%2e%2f", ".%2e", "%252e%252e", "%5c", "\\", "a%20b", ";", "acme;x", "%00", "%",
])
PATHS = st.lists(PIECE, max_size=8).map(lambda parts: "/" + "/".join(parts))
QUERY = st.sampled_from(["", "?a=/../other", "?/repos/other", "#/x"])


def _inside(path: str) -> bool:
    return path == "/repos/acme" or path.startswith("/repos/acme/")


def _rfc3986(path: str) -> str:
    """remove_dot_segments on the string, as RFC 3986 5.2.4 writes it."""
    out, s = "", path
    while s:
        if s.startswith("../"):
            s = s[3:]
        elif s.startswith("./"):
            s = s[2:]
        elif s.startswith("/./"):
            s = s[2:]
        elif s == "/.":
            s = "/"
        elif s.startswith("/../"):
            s, out = s[3:], out[: out.rfind("/")] if "/" in out else ""
        elif s == "/..":
            s, out = "/", out[: out.rfind("/")] if "/" in out else ""
        elif s in (".", ".."):
            s = ""
        else:
            i = s.find("/", 1)
            seg, s = (s, "") if i < 0 else (s[:i], s[i:])
            out += seg
    return out


def _servers(target: str) -> list[str]:
    """How some real servers read a target: each decodes, splits and resolves in its order."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    decoded = unquote(path, errors="strict")
    return [
        posixpath.normpath(decoded) if decoded != "/" else "/",  # decode, merge, resolve
        _rfc3986(decoded),  # decode, then resolve (nginx-like)
        unquote(_rfc3986(path)),  # resolve raw, then decode (a %2e%2e stays a name)
        re.sub("/+", "/", decoded),  # a router: no dot resolution
        re.sub("/+", "/", _rfc3986(decoded)),
    ]


@settings(max_examples=3000, deadline=None)
@given(path=PATHS, query=QUERY)
def test_no_allowed_path_escapes_the_prefix(path, query):
    rp = RequestPath.of(path + query)
    if not ACME.matches(rp):
        return
    for seen in _servers(path):
        assert _inside(seen), (path, seen)


@settings(max_examples=500, deadline=None)
@given(rest=st.lists(st.sampled_from(["a", "b", "x.json", "acme", "repos", "a b"]),
                     max_size=5))
def test_plain_paths_under_the_prefix_are_allowed(rest):
    # The positive side of the property: ordinary paths under the prefix all pass.
    target = "/repos/acme/" + "/".join(rest)
    assert ACME.matches(RequestPath.of(target.replace(" ", "%20")))


@given(target=st.text(max_size=40))
def test_reading_never_raises(target):
    rp = RequestPath.of(target)
    assert (rp.path is None) == (not rp.readings)
    assert all(r.startswith("/") for r in rp.readings)
