"""Request paths for method/path rules: how a path is read, and path patterns.

Pure: no iptc, pyroute2 or mitmproxy here.

A path rule (`paths = ["/repos/acme/*"]`) must not be escaped by the many ways one path
can be written, so a request path is not matched as one string but as every way a
common server reads it (`RequestPath.readings`), and a pattern allows it only if it
matches ALL of them. The readings:

- the query string is ignored (and a fragment, which clients never send);
- percent-escapes are decoded once, as UTF-8. Invalid escapes, invalid UTF-8, a `%`
  left after decoding (double encoding, `%252e`), a backslash (a separator on some
  servers), a NUL or another control character: the path has no reading at all, and
  only a rule without `paths` can allow it;
- some servers split the path into segments before decoding (`%2F` stays inside a
  segment), others after (`%2F` is a separator);
- some resolve dot segments (`.`, `..`, RFC 3986 5.2.4, never above `/`), others
  route on the path as written (a dot segment is a name);
- some merge repeated slashes (before or after resolving dots), others do not.

That is ten readings. `/repos/acme/x/../y` reads as `/repos/acme/y` and as
`/repos/acme/x/../y`: both under `/repos/acme/`, allowed. `/repos/acme/..%2Fother`
reads, among others, as `/repos/other`: refused. `/repos/other/../acme/x` reads as
`/repos/other/../acme/x` to a router that does not resolve dots, and `/repos//acme/x` as
itself to one that does not merge slashes: both refused.
`/api/v4/projects/acme%2Frepo` (GitLab) reads as `/api/v4/projects/acme/repo` every way.

A path pattern is written decoded and starts with `/`; `*` matches any run of
characters, `/` included. `/repos/acme/*` matches `/repos/acme/` and everything under
it, and (as `*.example.com` matches `example.com`) the bare `/repos/acme` too. Without
`*`, a pattern matches exactly that path. Matching is case-sensitive, as paths are.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable
from urllib.parse import unquote_to_bytes

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _decode(raw: str) -> str | None:
    """Percent-decode `raw` once as UTF-8; None if that is not well defined."""
    if _BAD_PERCENT.search(raw):
        return None
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _merge(segments: list[str]) -> list[str]:
    """Drop empty segments (repeated slashes), except a trailing one (a trailing slash)."""
    return [s for s in segments[:-1] if s] + segments[-1:]


def _resolve(segments: list[str]) -> list[str]:
    """RFC 3986 remove_dot_segments, on segments."""
    out: list[str] = []
    for i, seg in enumerate(segments):
        if seg in (".", ".."):
            if seg == ".." and out:
                out.pop()
            if i == len(segments) - 1:
                out.append("")  # "/a/b/.." is "/a/": a directory
            continue
        out.append(seg)
    return out


def _join(segments: list[str]) -> str:
    return "/" + "/".join(_merge(segments))


@dataclasses.dataclass(frozen=True)
class RequestPath:
    """A request target's path as servers read it.

    `path`: the canonical reading (decoded, then split, dot segments resolved, slashes
    merged), for messages and logs; None if the target has no valid reading. `readings`: every
    reading (empty if none).
    """

    target: str
    path: str | None
    readings: frozenset[str]

    @classmethod
    def of(cls, target: str) -> RequestPath:
        """Read a request target in origin form (`/path?query`). Anything else (`*`, an
        absolute URL, an empty string) has no reading."""
        path = target.split("?", 1)[0].split("#", 1)[0]
        if not path.startswith("/") or "\\" in path or _CONTROL.search(path):
            return cls(target, None, frozenset())
        decoded = [_decode(s) for s in path[1:].split("/")]
        segs = [d for d in decoded if d is not None]
        if len(segs) != len(decoded) or any(
            "%" in s or "\\" in s or _CONTROL.search(s) for s in segs
        ):
            return cls(target, None, frozenset())
        split_after = "/".join(segs).split("/")  # %2F is a separator
        readings = set()
        for s in (segs, split_after):
            for resolved in (s, _resolve(s)):
                readings.add("/" + "/".join(resolved))
                readings.add(_join(resolved))
            readings.add(_join(_resolve(_merge(s))))
        return cls(target, _join(_resolve(split_after)), frozenset(readings))


@dataclasses.dataclass(frozen=True)
class PathPattern:
    """A path pattern as the operator wrote it (see the module docstring)."""

    text: str

    @classmethod
    def parse(cls, text: str) -> PathPattern:
        """The pattern, or ValueError saying why `text` is not one."""
        if not text.startswith("/"):
            raise ValueError(f"{text!r}: a path pattern starts with '/'")
        if "?" in text or "#" in text:
            raise ValueError(f"{text!r}: a path pattern has no query string "
                             "(the query is not matched)")
        if "%" in text:
            raise ValueError(f"{text!r}: write the path decoded ('/a b', not '/a%20b'): "
                             "paths are decoded before they are matched")
        if "\\" in text or _CONTROL.search(text):
            raise ValueError(f"{text!r}: a backslash or control character never matches")
        segments = text[1:].split("/")
        if any(s in (".", "..") for s in segments):
            raise ValueError(f"{text!r}: a '.' or '..' segment never matches "
                             "(paths are matched after they are resolved)")
        if any(s == "" for s in segments[:-1]):
            raise ValueError(f"{text!r}: '//' never matches (repeated slashes are merged)")
        return cls(text)

    @functools.cached_property
    def _regex(self) -> re.Pattern[str]:
        def glob(t: str) -> str:
            return ".*".join(re.escape(part) for part in t.split("*"))

        if self.text.endswith("/*"):
            return re.compile(glob(self.text[:-2]) + "(?:/.*)?", re.DOTALL)
        return re.compile(glob(self.text), re.DOTALL)

    def matches_one(self, path: str) -> bool:
        return self._regex.fullmatch(path) is not None

    def matches(self, path: RequestPath | Iterable[str]) -> bool:
        """True if the pattern matches every reading of `path` (and there is one)."""
        readings = path.readings if isinstance(path, RequestPath) else frozenset(path)
        return bool(readings) and all(self.matches_one(r) for r in readings)

    def __str__(self) -> str:
        return self.text
