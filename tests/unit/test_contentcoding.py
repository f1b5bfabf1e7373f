"""Content-encodings decoded whole and as streams, with bounded output."""

import gzip
import zlib

import brotli
import pytest
import zstandard

from panopticond import contentcoding as cc

DATA = b"hello PLACEHOLDER world " * 2000


def encodings():
    raw_deflate = zlib.compressobj(wbits=-15)
    return {
        "gzip": gzip.compress(DATA),
        "x-gzip": gzip.compress(DATA),
        "deflate": zlib.compress(DATA),
        "deflate-raw": raw_deflate.compress(DATA) + raw_deflate.flush(),
        "br": brotli.compress(DATA),
        "zstd": zstandard.ZstdCompressor().compress(DATA),
    }


@pytest.mark.parametrize("name", list(encodings()))
def test_whole_and_streamed_in_any_chunking(name):
    blob = encodings()[name]
    enc = "deflate" if name == "deflate-raw" else name
    assert cc.decode(blob, enc, 10**7) == DATA
    for size in (1, 7, 100, 4096, len(blob)):
        d = cc.StreamDecoder(enc)
        out = b"".join(p for i in range(0, len(blob), size) for p in d.feed(blob[i:i + size]))
        d.end()
        assert out == DATA, (name, size)


def test_identity_and_supported():
    assert cc.decode(b"abc", "", 1) == b"abc" and cc.decode(b"abc", "Identity", 1) == b"abc"
    assert cc.supported("GZIP") and cc.supported("br") and not cc.supported("compress")
    assert not cc.supported("gzip, br")


@pytest.mark.parametrize("blob, enc", [(b"not gzip", "gzip"), (gzip.compress(DATA)[:50], "gzip"),
                                       (b"\x00\x01", "br"), (b"x", "compress"),
                                       (gzip.compress(b"a") + b"junk", "gzip")])
def test_refused(blob, enc):
    with pytest.raises(cc.DecodeError):
        cc.decode(blob, enc, 10**7)


def test_a_bomb_stops_at_the_limit_and_streams_in_bounded_pieces():
    bomb = gzip.compress(b"\0" * (50 * 1024 * 1024))
    with pytest.raises(cc.DecodeError, match="more than"):
        cc.decode(bomb, "gzip", 1024 * 1024)
    d = cc.StreamDecoder("gzip")
    assert max(len(p) for p in d.feed(bomb)) <= cc.PIECE
