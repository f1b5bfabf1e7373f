"""Just enough of the DNS wire format (RFC 1035) for the lab's authoritative server.

One question in, A/AAAA answers out. Hand-rolled rather than mitmproxy's `dns` module
so that the lab's server process starts in tens of milliseconds.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
         33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_HEADER = struct.Struct("!HHHHHH")


class DNSFormatError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str  # lower case, no trailing dot; "" for the root
    qtype: int
    question: bytes  # as received (keeps the client's 0x20 case), echoed in the answer
    count: int  # questions in the message

    @property
    def type_name(self) -> str:
        return TYPES.get(self.qtype, f"TYPE{self.qtype}")


def parse_query(data: bytes) -> Query:
    """Parse the header and the first question; raise DNSFormatError on anything malformed."""
    if len(data) < _HEADER.size:
        raise DNSFormatError("short header")
    ident, flags, qdcount, _, _, _ = _HEADER.unpack_from(data)
    if qdcount < 1:
        raise DNSFormatError("no question")
    labels, pos = [], _HEADER.size
    while True:
        if pos >= len(data):
            raise DNSFormatError("truncated name")
        length = data[pos]
        if length & 0xC0:
            # Compression pointers belong to answers, never to a query's first question.
            raise DNSFormatError("unexpected label type")
        pos += 1
        if length == 0:
            break
        labels.append(data[pos:pos + length].decode("ascii", "backslashreplace"))
        pos += length
        if len(labels) > 127:
            raise DNSFormatError("name too long")
    if pos + 4 > len(data):
        raise DNSFormatError("truncated question")
    qtype, _qclass = struct.unpack_from("!HH", data, pos)
    return Query(ident, flags, ".".join(labels).lower(), qtype, data[_HEADER.size:pos + 4],
                 qdcount)


def build_response(query: Query, rcode: int, answers: list[str], ttl: int = 30) -> bytes:
    """An authoritative answer to `query` holding one A or AAAA record per address."""
    opcode = (query.flags >> 11) & 0xF
    flags = 0x8000 | (opcode << 11) | 0x0400 | (query.flags & 0x0100) | 0x0080 | rcode
    out = [_HEADER.pack(query.id, flags, 1, len(answers), 0, 0), query.question]
    for address in answers:
        packed = ipaddress.ip_address(address).packed
        rtype = 1 if len(packed) == 4 else 28
        # 0xC00C points at the question's name, right after the 12-byte header.
        out.append(b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, ttl, len(packed)) + packed)
    return b"".join(out)


def build_error(data: bytes, rcode: int) -> bytes | None:
    """A bare error answer echoing the id of a message we could not parse, if it has one."""
    if len(data) < 4:
        return None
    ident, flags = struct.unpack_from("!HH", data)
    if flags & 0x8000:  # never answer an answer
        return None
    return _HEADER.pack(ident, 0x8000 | (flags & 0x7900) | 0x0080 | rcode, 0, 0, 0, 0)
