"""Decoding HTTP content-encodings, whole or as a stream, with the output bounded.

Pure (zlib, and brotli and zstandard, which mitmproxy itself depends on). A body is
scanned for secrets after its content-encoding is removed, so an agent cannot hide a
placeholder or a credential in a gzip body; and the decoder's output is bounded so that
a small compressed body cannot balloon in the proxy's memory (a decompression bomb):

- `decode(data, encoding, limit)`: the whole body, or `DecodeError` if the encoding is
  unknown, the data is corrupt or truncated, or it decodes to more than `limit` bytes;
- `StreamDecoder(encoding)`: `feed(chunk)` yields the decoded data in pieces of at most
  `PIECE` bytes (zlib) or of what one small input slice decodes to (brotli, zstd, whose
  Python bindings have no output limit), `end()` raises if the stream was truncated.

`encoding` is the Content-Encoding header's value; "" and "identity" mean none. Stacked
encodings ("gzip, br") are refused rather than half-decoded.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

try:
    import brotli
except ImportError:  # pragma: no cover - a dependency of mitmproxy
    brotli = None
try:
    import zstandard
except ImportError:  # pragma: no cover - a dependency of mitmproxy
    zstandard = None

PIECE = 256 * 1024  # most bytes a zlib stream decoder returns at once
SLICE = 4096  # input fed at once to decoders without an output limit

IDENTITY = ("", "identity")


class DecodeError(ValueError):
    """The body cannot be decoded: unknown encoding, corrupt, truncated or too large."""


def normalise(encoding: str) -> str:
    return encoding.strip().lower()


def supported(encoding: str) -> bool:
    e = normalise(encoding)
    if e in IDENTITY or e in ("gzip", "x-gzip", "deflate"):
        return True
    return (e == "br" and brotli is not None) or (e == "zstd" and zstandard is not None)


def decode(data: bytes, encoding: str, limit: int) -> bytes:
    """`data` without its content-encoding; DecodeError past `limit` decoded bytes."""
    e = normalise(encoding)
    if e in IDENTITY:
        return data
    dec = StreamDecoder(e)
    out = bytearray()
    for piece in dec.feed(data):
        out += piece
        if len(out) > limit:
            raise DecodeError(f"it decodes to more than {limit} bytes")
    dec.end()
    return bytes(out)


class StreamDecoder:
    """Incremental decoder of one content-encoding (not identity)."""

    def __init__(self, encoding: str):
        self.encoding = e = normalise(encoding)
        self._zlib = None
        self._other = None
        self._pending = b""  # deflate: the first bytes, until the format is known
        if e in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif e == "deflate":
            self._zlib = None  # zlib-wrapped or raw: decided on the first bytes
        elif e == "br" and brotli is not None:
            self._other = brotli.Decompressor()
        elif e == "zstd" and zstandard is not None:
            self._other = zstandard.ZstdDecompressor().decompressobj()
        else:
            raise DecodeError(f"unsupported content-encoding {encoding!r}")

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            if self.encoding == "deflate" and self._zlib is None:
                data = self._pending + data
                if len(data) < 2:
                    self._pending = data
                    return
                # RFC 9110 says zlib format; some servers send raw deflate. The first
                # byte of a zlib stream is 0x?8 with a header checksum that holds.
                zlib_header = (data[0] & 0x0F) == 8 and ((data[0] << 8) | data[1]) % 31 == 0
                self._zlib = zlib.decompressobj(zlib.MAX_WBITS if zlib_header
                                                else -zlib.MAX_WBITS)
            if self._zlib is not None:
                yield from self._feed_zlib(data)
            else:
                for i in range(0, len(data), SLICE):
                    piece = self._process(data[i:i + SLICE])
                    if piece:
                        yield piece
        except (zlib.error, EOFError) as e:
            raise DecodeError(f"corrupt {self.encoding} data: {e}") from None
        except Exception as e:  # brotli.error, zstandard.ZstdError
            if isinstance(e, DecodeError):
                raise
            raise DecodeError(f"corrupt {self.encoding} data: {e}") from None

    def _feed_zlib(self, data: bytes) -> Iterator[bytes]:
        d = self._zlib
        assert d is not None
        if d.eof:
            if data.strip(b"\0"):
                raise DecodeError(f"data after the end of the {self.encoding} stream")
            return
        buf = data
        while True:
            piece = d.decompress(buf, PIECE)
            if piece:
                yield piece
            buf = d.unconsumed_tail
            if d.eof:
                if (buf + d.unused_data).strip(b"\0"):
                    # A second gzip member, or junk: neither is decoded here, so refuse.
                    raise DecodeError(f"data after the end of the {self.encoding} stream")
                return
            if not buf:
                return

    def _process(self, data: bytes) -> bytes:
        if self.encoding == "br":
            return self._other.process(data)
        return self._other.decompress(data)

    def end(self) -> None:
        """Raise DecodeError if the stream stopped before its end."""
        if self._zlib is not None:
            if not self._zlib.eof:
                raise DecodeError(f"the {self.encoding} data is truncated")
        elif self.encoding == "br":
            if not self._other.is_finished():
                raise DecodeError("the br data is truncated")
        elif self.encoding == "zstd":
            if not self._other.eof:
                raise DecodeError("the zstd data is truncated")
        elif self.encoding == "deflate":
            raise DecodeError("the deflate data is empty")
