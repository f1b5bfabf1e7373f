"""Secrets and their placeholders in bytes: the forms they take, finding and swapping them,
also in streams cut into arbitrary chunks.

Pure (stdlib, and `dlp` for credential shapes). The proxy's `secretswap` addon is the
only user; everything here is tested without mitmproxy.

Forms. A value can travel as itself or encoded; `encoded_forms()` lists the byte strings
to look for: plain; base64 in the standard and URL-safe alphabets, at each of the three
alignments a value can have inside a longer base64 text (only the characters that
depend on the value alone are kept, so `Basic base64("user:" + value)` is found too);
hex in lower and upper case; and, for DNS names, base32 at its five alignments, case
folded. Percent-encoding (whole or partial, any case) is covered differently: the
`Inspector` also scans a percent-decoded copy of any data that holds a '%'.

Finding: `Inspector.scan(data)` returns `Hit`s: a secret's real value (a breach), a
placeholder where it may not go (a tripwire), or a credential shape (DLP).

Swapping: `Replacer` replaces byte strings (longest first, left to right, never
overlapping); `StreamReplacer` does it over a stream and holds back the longest tail of
each chunk that could be the start of a guarded pattern, so a value split across chunks
is swapped whole and no fragment of a guarded pattern is ever passed on before it is
known to be harmless. `StreamInspector` scans a stream through a window that keeps the
last `overlap` bytes of the previous chunk, so a split value is still found; memory is
bounded by the window, whatever the stream's length.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import quote

from panopticond import dlp

PLACEHOLDER = "placeholder"
VALUE = "value"
DLP = "dlp"

MIN_FORM = 8  # shorter encoded fragments would match by chance
DLP_OVERLAP = 512  # bytes of context kept for credential shapes split across chunks

_PCT = re.compile(rb"%[0-9A-F]{2}")
_PCT_ANY = re.compile(rb"%[0-9A-Fa-f]{2}")
_PCT_BYTES = {f"%{i:02X}".encode(): bytes([i]) for i in range(256)}


def _unquote(data: bytes) -> bytes:
    return _PCT_ANY.sub(lambda m: _PCT_BYTES[m.group().upper()], data)


def percent_regions(data: bytes, margin: int) -> list[bytes]:
    """The percent-decoded neighbourhoods (`margin` bytes either side) of the escapes in
    `data`, merged where they touch: a value percent-encoded in whole or in part lies
    within one, and data with no escape at all (or a few, as random bytes have) costs
    next to nothing to look at again."""
    spans: list[list[int]] = []
    for m in _PCT_ANY.finditer(data):
        lo, hi = max(0, m.start() - margin), m.end() + margin
        if spans and lo <= spans[-1][1]:
            spans[-1][1] = hi
        else:
            spans.append([lo, hi])
    return [_unquote(data[lo:hi]) for lo, hi in spans]


def _fragment(value: bytes, offset: int, encode: Callable[[bytes], bytes], bits: int) -> bytes:
    """The characters of encode(prefix + value) that only `value` determines, where the
    prefix is `offset` bytes long (`bits` per output character)."""
    enc = encode(b"\0" * offset + value).rstrip(b"=")
    start = -(-8 * offset // bits)
    end = 8 * (offset + len(value)) // bits
    return enc[start:end]


def encoded_forms(value: bytes, *, base32: bool = False) -> dict[bytes, str]:
    """Byte strings under which `value` can appear in data -> the form's name."""
    out: dict[bytes, str] = {value: "plain"}
    for f in (value.hex().encode(), value.hex().upper().encode()):
        out.setdefault(f, "hex")
    for a in range(3):
        f = _fragment(value, a, base64.b64encode, 6)
        out.setdefault(f, "base64")
        out.setdefault(f.replace(b"+", b"-").replace(b"/", b"_"), "base64")
    if base32:
        for a in range(5):
            f = _fragment(value, a, base64.b32encode, 5)
            out.setdefault(f, "base32")
            out.setdefault(f.lower(), "base32")
    return {k: v for k, v in out.items() if len(k) >= MIN_FORM or v == "plain"}


def json_variants(value: bytes) -> list[bytes]:
    """How `value` (ASCII) reads inside a JSON string, by common encoders (one may be
    plain). The same positions of two calls are the same encoder."""
    j = json.dumps(value.decode("ascii", "backslashreplace"))[1:-1].encode()
    return [j, j.replace(b"/", b"\\/")]


def percent_variants(value: bytes) -> list[bytes]:
    """How `value` reads percent-encoded by common encoders (one may be plain)."""
    out = []
    for safe in ("", "/"):
        f = quote(value, safe=safe).encode()
        out += [f, _PCT.sub(lambda m: m.group().lower(), f)]
    return out


def url_escape(value: bytes) -> bytes:
    """`value` made safe in any part of a URL (and in a form body): RFC 3986 unreserved
    characters stay, everything else is percent-encoded."""
    return quote(value, safe="-._~").encode()


def json_escape(value: bytes) -> bytes:
    return json.dumps(value.decode("ascii", "backslashreplace"))[1:-1].encode()


@dataclasses.dataclass(frozen=True)
class Secret:
    """A secret as the proxy knows it. `value` is the real one: never log or show it."""

    name: str
    placeholder: bytes
    value: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Hit:
    kind: str  # VALUE (a breach), PLACEHOLDER (a tripwire) or DLP
    name: str  # the secret's name, or the DLP rule's
    form: str  # plain, base64, hex, base32, percent (+inner form), shape
    start: int = 0  # in the data scanned (or its percent-decoded view)
    end: int = 0
    view: str = "raw"  # or "percent"

    @property
    def blocking(self) -> bool:
        """Tripwires and breaches always block; DLP hits block depending on the mode."""
        return self.kind != DLP


_SEVERITY = {VALUE: 0, PLACEHOLDER: 1, DLP: 2}


class Needles:
    """Labelled byte strings, found with `bytes.find` (one C search per string; at the
    handful of strings per secret this beats a regex alternation by far)."""

    def __init__(self, items: dict[bytes, tuple[str, str, str]]):
        # Longest first, so that of two forms found at once the more specific is named.
        self.items = sorted(items.items(), key=lambda kv: (-len(kv[0]), kv[0]))
        self.maxlen = max((len(k) for k in items), default=0)

    def __bool__(self) -> bool:
        return bool(self.items)

    def search(self, data: bytes, view: str = "raw") -> list[Hit]:
        out = []
        for needle, (kind, name, form) in self.items:
            i = data.find(needle)
            if i >= 0:
                if view == "percent":
                    form = "percent" if form == "plain" else f"percent+{form}"
                out.append(Hit(kind, name, form, i, i + len(needle), view))
        return out


class Inspector:
    """Scans bytes for the needles of one context (a request to some host, a response)
    and, if it has a detector, for credential shapes. Hits come most severe first."""

    def __init__(self, needles: Needles, detector: dlp.Detector | None = None):
        self.needles = needles
        self.detector = detector
        self.overlap = max(3 * needles.maxlen, DLP_OVERLAP if detector else 0)

    def scan(self, data: bytes) -> list[Hit]:
        hits = self.needles.search(data)
        views = [(data, "raw")]
        if b"%" in data:
            for region in percent_regions(data, self.overlap):
                hits += self.needles.search(region, "percent")
                views.append((region, "percent"))
        if self.detector is not None:
            for view, label in views:
                hits += [Hit(DLP, m.rule, "shape", m.start, m.end, label)
                         for m in self.detector.scan(view)]
        hits.sort(key=lambda h: _SEVERITY[h.kind])
        return hits


class StreamInspector:
    """`Inspector` over a stream: `feed(chunk)` returns the hits in the window of the kept
    tail and the new chunk; a value split across chunks is found once its last byte
    arrives. A DLP hit wholly inside the raw tail is not reported again; a blocking one
    is (it ended the stream the first time), and so is one in a percent-decoded view,
    whose offsets are its own (the addon logs a rule once per flow and place anyway)."""

    def __init__(self, inspector: Inspector):
        self.inspector = inspector
        self.overlap = inspector.overlap
        self._tail = b""

    def feed(self, chunk: bytes) -> list[Hit]:
        if not chunk:
            return []
        window = self._tail + chunk
        hits = self.inspector.scan(window)
        old = len(self._tail)
        self._tail = window[-self.overlap:] if self.overlap else b""
        return [h for h in hits if h.blocking or h.view != "raw" or h.end > old]


class Replacer:
    """Replaces byte strings by others: at each position the longest that matches wins."""

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]]):
        self.map = {old: new for old, new in pairs if old and old != new}
        olds = sorted(self.map, key=lambda o: (-len(o), o))
        self.olds = tuple(olds)
        self._rx = re.compile(b"|".join(re.escape(o) for o in olds)) if olds else None

    def __bool__(self) -> bool:
        return self._rx is not None

    def replace(self, data: bytes) -> tuple[bytes, int]:
        """(new data, number of replacements)."""
        if self._rx is None or not any(o in data for o in self.olds):
            return data, 0
        return self._rx.subn(lambda m: self.map[m.group()], data)


def partial_suffix(buf: bytes, patterns: Sequence[bytes]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of a pattern."""
    best = 0
    n = len(buf)
    for p in patterns:
        i = buf.find(p[:1], max(0, n - len(p) + 1))
        while i != -1 and n - i > best:
            if p.startswith(buf[i:]):
                best = n - i
                break
            i = buf.find(p[:1], i + 1)
    return best


class StreamReplacer:
    """`Replacer` over a stream. `guard`: more patterns (besides the replaced ones)
    that must never be passed on in part, because a later chunk may complete them."""

    def __init__(self, replacer: Replacer, guard: Iterable[bytes] = ()):
        self.replacer = replacer
        self.guard = tuple(dict.fromkeys((*replacer.olds, *(g for g in guard if g))))
        self.count = 0
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        buf = self._held + chunk
        cut = len(buf) - partial_suffix(buf, self.guard)
        rx = self.replacer._rx
        if rx is None or not any(o in buf for o in self.replacer.olds):
            self._held = buf[cut:]
            return buf[:cut]
        out = []
        pos = 0
        for m in rx.finditer(buf):
            if m.start() >= cut:
                break
            out += (buf[pos:m.start()], self.replacer.map[m.group()])
            pos = m.end()
            self.count += 1
        cut = max(cut, pos)
        out.append(buf[pos:cut])
        self._held = buf[cut:]
        return b"".join(out)

    def flush(self) -> bytes:
        data, n = self.replacer.replace(self._held)
        self.count += n
        self._held = b""
        return data

    @property
    def held(self) -> int:
        return len(self._held)


class Catalog:
    """Every secret of an instance and every form it can take, with the inspectors and
    replacers for each context built once and cached (contexts are few)."""

    def __init__(self, secrets: Sequence[Secret], rules: Sequence[dlp.Rule] = ()):
        self.secrets = {s.name: s for s in secrets}
        self.rules = tuple(rules)
        self.detector = dlp.Detector(self.rules, ignore=[s.placeholder for s in secrets]) \
            if self.rules else None
        self._placeholder_forms = {
            s.name: encoded_forms(s.placeholder) for s in secrets}
        self._value_forms = {s.name: encoded_forms(s.value) for s in secrets}
        self._cache: dict[object, object] = {}
        self._names = self._name_needles()

    def request_inspector(self, exempt: frozenset[str] = frozenset()) -> Inspector:
        """For what the agent sends: every real value (a breach), the placeholders of
        every secret not in `exempt` (a tripwire), and credential shapes."""
        key = ("request", exempt)
        if key not in self._cache:
            items: dict[bytes, tuple[str, str, str]] = {}
            for name, forms in self._value_forms.items():
                for f, form in forms.items():
                    items.setdefault(f, (VALUE, name, form))
            for name, forms in self._placeholder_forms.items():
                if name not in exempt:
                    for f, form in forms.items():
                        items.setdefault(f, (PLACEHOLDER, name, form))
            self._cache[key] = Inspector(Needles(items), self.detector)
        return self._cache[key]  # type: ignore[return-value]

    def response_rules(self) -> tuple[Replacer, Inspector]:
        """For what comes back to the agent: a real value in plain, JSON-escaped or
        percent-encoded form is replaced by the same form of its placeholder; in any
        other form (base64, hex) it cannot be swapped in place and blocks."""
        if "response" not in self._cache:
            pairs = []
            for s in self.secrets.values():
                pairs.append((s.value, s.placeholder))
                for variants in (json_variants, percent_variants):
                    pairs += [(v, p) for v, p in zip(variants(s.value), variants(s.placeholder))
                              if v != s.value]
            replacer = Replacer(dict(reversed(pairs)).items())
            items: dict[bytes, tuple[str, str, str]] = {}
            for name, forms in self._value_forms.items():
                for f, form in forms.items():
                    if form != "plain" and f not in replacer.map:
                        items.setdefault(f, (VALUE, name, form))
            self._cache["response"] = (replacer, Inspector(Needles(items)))
        return self._cache["response"]  # type: ignore[return-value]

    def name_hits(self, name: str) -> list[Hit]:
        """Secrets in a host name (a DNS question, an SNI): case-insensitive forms
        (plain, hex, base32) and base64, in the name and in its labels joined."""
        ci, cs = self._names
        lowered = name.lower().encode("ascii", "replace")
        exact = name.encode("ascii", "replace")
        hits = []
        for data in (lowered, lowered.replace(b".", b"")):
            hits += ci.search(data)
        for data in (exact, exact.replace(b".", b"")):
            hits += cs.search(data)
        hits.sort(key=lambda h: _SEVERITY[h.kind])
        return hits

    def _name_needles(self) -> tuple[Needles, Needles]:
        ci: dict[bytes, tuple[str, str, str]] = {}
        cs: dict[bytes, tuple[str, str, str]] = {}
        for s in self.secrets.values():
            for kind, value in ((VALUE, s.value), (PLACEHOLDER, s.placeholder)):
                for f, form in encoded_forms(value, base32=True).items():
                    if form == "base64":
                        cs.setdefault(f, (kind, s.name, form))
                    else:
                        ci.setdefault(f.lower(), (kind, s.name, form))
        return Needles(ci), Needles(cs)
