"""The scanner and swapper: forms, inspection, replacement, and both over chunked streams."""

import base64
import binascii
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from panopticond import dlp
from panopticond.secretscan import (
    DLP, PLACEHOLDER, VALUE, Catalog, Inspector, Needles, Replacer, Secret, StreamInspector,
    StreamReplacer, encoded_forms, json_variants, partial_suffix, percent_variants, url_escape,
)

PH = b"PLACEHOLDER_SECRET_VALUE_OPENAI"
REAL = b"real/Value+0123456789=abcdefXYZ"
PH2 = b"PLACEHOLDER_SECRET_VALUE_GITHUB"
REAL2 = b"gh-real-9f8e7d6c5b4a39281706"
SECRETS = [Secret("OPENAI", PH, REAL), Secret("GITHUB", PH2, REAL2)]


@pytest.fixture(scope="module")
def catalog():
    return Catalog(SECRETS, dlp.BUILTIN)


def kinds(hits):
    return [(h.kind, h.name, h.form) for h in hits]


# --- forms -----------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [b"", b"a", b"ab", b"abc", b"user:", b"xyzw12"])
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_is_found_at_every_alignment(prefix, encode):
    forms = encoded_forms(PH)
    text = encode(prefix + PH + b"tail")
    assert any(f in text for f, form in forms.items() if form == "base64"), (prefix, text)


@given(st.binary(max_size=20), st.binary(max_size=20), st.binary(min_size=8, max_size=60))
def test_any_value_is_found_in_base64_and_hex_of_any_embedding(before, after, value):
    forms = encoded_forms(value)
    b64 = base64.b64encode(before + value + after)
    assert any(f in b64 for f, form in forms.items() if form == "base64")
    hexed = (before + value + after).hex().encode()
    assert any(f in hexed for f in forms)
    assert any(f in hexed.upper() for f in forms)


@given(st.binary(max_size=10), st.binary(min_size=8, max_size=40))
def test_base32_forms_for_names(before, value):
    forms = encoded_forms(value, base32=True)
    text = base64.b32encode(before + value)
    assert any(f in text for f, form in forms.items() if form == "base32")
    assert any(f in text.lower() for f, form in forms.items() if form == "base32")


def test_short_fragments_are_not_kept():
    assert all(len(f) >= 8 for f in encoded_forms(b"12345678"))


def test_variants_line_up_between_value_and_placeholder():
    assert json_variants(b'a/b"c') == [b'a/b\\"c', b'a\\/b\\"c']
    assert percent_variants(b"a/b+c") == [b"a%2Fb%2Bc", b"a%2fb%2bc", b"a/b%2Bc", b"a/b%2bc"]
    assert url_escape(b"a/b+c=d~e_f.g-h") == b"a%2Fb%2Bc%3Dd~e_f.g-h"


# --- inspection ------------------------------------------------------------------------

@pytest.mark.parametrize("data, form", [
    (b"x " + PH + b" y", "plain"),
    (b"Authorization: Basic " + base64.b64encode(b"user:" + PH), "base64"),
    (base64.urlsafe_b64encode(b"ab" + PH), "base64"),
    (b"q=" + PH.hex().encode(), "hex"),
    (b"q=" + PH.hex().upper().encode(), "hex"),
    (b"q=" + "".join(f"%{c:02X}" for c in PH).encode(), "percent"),
    (b"q=" + "".join(f"%{c:02x}" for c in PH).encode(), "percent"),
    (b"q=" + PH[:5] + b"%48" + PH[6:], "percent"),  # partly encoded
    (b"q=" + quote(base64.b64encode(b"k" + PH).decode(), safe="").encode(), "percent+base64"),
])
def test_placeholder_in_every_form_is_a_tripwire(catalog, data, form):
    hits = catalog.request_inspector().scan(data)
    assert (PLACEHOLDER, "OPENAI", form) in kinds(hits), kinds(hits)


def test_exempt_placeholders_are_not_hits_but_values_always_are(catalog):
    insp = catalog.request_inspector(frozenset({"OPENAI"}))
    assert insp.scan(b"Bearer " + PH) == []
    assert kinds(insp.scan(b"Bearer " + PH2)) == [(PLACEHOLDER, "GITHUB", "plain")]
    assert kinds(insp.scan(b"k=" + REAL))[0] == (VALUE, "OPENAI", "plain")
    assert kinds(insp.scan(base64.b64encode(b"z" + REAL2)))[0] == (VALUE, "GITHUB", "base64")


def test_breaches_come_before_tripwires_before_dlp(catalog):
    data = b"ghp_" + b"a1B2" * 9 + b" " + PH + b" " + REAL
    assert [h.kind for h in catalog.request_inspector().scan(data)][:3] == [VALUE, PLACEHOLDER,
                                                                            DLP]


def test_nothing_in_ordinary_data(catalog):
    data = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}' * 50
    assert catalog.request_inspector().scan(data) == []


def test_names_are_checked_case_folded_and_in_joined_labels(catalog):
    assert kinds(catalog.name_hits(PH.decode().lower() + ".evil.example"))[0] == (
        PLACEHOLDER, "OPENAI", "plain")
    h = PH.hex()
    assert catalog.name_hits(f"{h[:40]}.{h[40:]}.evil.example")
    b32 = base64.b32encode(b"x" + PH).decode().rstrip("=").lower()
    assert catalog.name_hits(f"{b32[:50]}.{b32[50:]}.evil.example")
    assert not catalog.name_hits("api.openai.com")


# --- replacement -------------------------------------------------------------------------

def test_replacer_prefers_the_longest_and_counts():
    r = Replacer([(b"ab", b"1"), (b"abc", b"2"), (b"x", b"x")])
    assert r.replace(b"abcab-ab") == (b"21-1", 3)
    assert r.replace(b"nothing") == (b"nothing", 0)
    assert not Replacer([])


def test_response_rules_swap_plain_json_and_percent_forms_back(catalog):
    replacer, blocking = catalog.response_rules()
    data = (b'{"auth": "Bearer ' + json_variants(REAL)[1] + b'", "url": "/x?k='
            + quote(REAL, safe="").encode() + b'", "raw": "' + REAL + b'"}')
    new, n = replacer.replace(data)
    assert n == 3 and REAL not in new
    assert json_variants(PH)[1] in new or PH in new
    assert blocking.scan(new) == []
    assert kinds(blocking.scan(base64.b64encode(REAL)))[0][2] == "base64"
    assert blocking.scan(REAL) == []  # replaced, not blocked


def test_partial_suffix():
    assert partial_suffix(b"xxPLACE", [PH]) == 5
    assert partial_suffix(b"xxPLACEHOLDER_SECRET_VALUE_OPENAI", [PH]) == 0  # whole: no
    assert partial_suffix(b"xxP", [PH, b"Pq"]) == 1
    assert partial_suffix(b"abc", [b"zz"]) == 0


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for c in cuts:
        out.append(data[last:c])
        last = c
    out.append(data[last:])
    return out


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60), st.binary(max_size=60), st.lists(st.integers(0, 400), max_size=8),
       st.integers(0, 3))
def test_stream_replacer_equals_whole_replacement_however_cut(before, after, cuts, copies):
    data = before + (PH + b"--") * copies + after + PH[:7]
    whole, n = Replacer([(PH, REAL)]).replace(data)
    s = StreamReplacer(Replacer([(PH, REAL)]))
    out = b"".join(s.feed(c) for c in _chunks(data, cuts)) + s.flush()
    assert out == whole and s.count == n


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.lists(st.integers(0, 200), max_size=6))
def test_stream_replacer_never_passes_on_part_of_a_guarded_pattern(before, cuts):
    guard = base64.b64encode(REAL)[4:30]
    data = before + guard + b"end"
    s = StreamReplacer(Replacer([]), guard=[guard])
    outs = [s.feed(c) for c in _chunks(data, cuts)] + [s.flush()]
    stream = b"".join(outs)
    assert stream == data
    # No chunk boundary of what is passed on falls inside an occurrence of the pattern:
    # it is always passed on whole, in one piece, where a scanner can see it.
    bounds = set()
    pos = 0
    for o in outs:
        pos += len(o)
        bounds.add(pos)
    start = stream.find(guard)
    while start >= 0:
        assert not any(start < b < start + len(guard) for b in bounds), (start, bounds)
        start = stream.find(guard, start + 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=300), st.integers(0, 2),
       st.lists(st.integers(0, 4000), max_size=10), st.sampled_from(["plain", "b64", "hex",
                                                                      "pct"]))
def test_stream_inspector_finds_a_value_split_anywhere(before, after, offset, cuts, enc):
    payload = {
        "plain": PH, "b64": base64.b64encode(b"\0" * offset + PH),
        "hex": binascii.hexlify(PH), "pct": "".join(f"%{c:02X}" for c in PH).encode(),
    }[enc]
    data = before + payload + after
    insp = StreamInspector(Catalog(SECRETS).request_inspector())
    found = []
    for c in _chunks(data, cuts):
        found += insp.feed(c)
    assert any(h.kind == PLACEHOLDER and h.name == "OPENAI" for h in found)


def test_stream_inspector_memory_is_bounded_by_its_window():
    insp = StreamInspector(Catalog(SECRETS, dlp.BUILTIN).request_inspector())
    for _ in range(200):
        assert insp.feed(b"z" * 65536) == []
    assert len(insp._tail) == insp.overlap <= 4096


def test_stream_inspector_reports_a_dlp_hit_once():
    insp = StreamInspector(Inspector(Needles({}), dlp.Detector(dlp.BUILTIN)))
    key = b"AKIA" + b"Q" * 16
    assert [h.name for h in insp.feed(b"xx " + key + b" ")] == ["aws_access_key_id"]
    assert insp.feed(b"yy") == []  # still in the window, already reported
