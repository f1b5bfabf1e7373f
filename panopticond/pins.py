"""The pin table: which addresses the jail's DNS returned for which name, for a while.

Pure. The proxy connects for a name only to an address in this table (or to one it
resolved itself): never to the address the agent chose, which is whatever the agent
wanted it to be (threats 18, 19). The table is filled from the answers of the jail's own
DNS listener and from the proxy's own lookups, read when a request, a passthrough
connection or a raw TCP connection is about to be dialled.

Bounds: an entry lives for its TTL, but at least `min_ttl` (clients cache answers longer
than they are told: an expired pin would only make the proxy resolve the name again) and
at most `max_ttl` (an address given up by a name's owner stops counting); at most
`max_entries` (name, address) pairs are kept, the least recently refreshed dropped first,
so a flood of lookups costs bounded memory.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

MIN_TTL = 300
MAX_TTL = 3600
MAX_ENTRIES = 65536


@functools.lru_cache(maxsize=4096)  # per request, on the same few addresses
def canonical_ip(address: str) -> str:
    """The canonical text of an IP address (ValueError if it is none)."""
    return str(ipaddress.ip_address(address.split("%", 1)[0]))


class PinTable:
    def __init__(
        self, *, min_ttl: float = MIN_TTL, max_ttl: float = MAX_TTL,
        max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic,
    ):
        if not 0 <= min_ttl <= max_ttl or max_entries < 1:
            raise ValueError("pin table bounds: 0 <= min_ttl <= max_ttl, max_entries >= 1")
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_entries = max_entries
        self.clock = clock
        self._expiry: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._by_name: dict[str, dict[str, None]] = {}
        self._by_address: dict[str, dict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, name: str, addresses: Iterable[str], ttl: float) -> None:
        """Pin `addresses` (IP texts) to canonical `name` for `ttl` seconds, within bounds."""
        until = self.clock() + min(max(ttl, self.min_ttl), self.max_ttl)
        for a in addresses:
            key = (name, canonical_ip(a))
            self._expiry[key] = until
            self._expiry.move_to_end(key)
            self._by_name.setdefault(key[0], {})[key[1]] = None
            self._by_address.setdefault(key[1], {})[key[0]] = None
        while len(self._expiry) > self.max_entries:
            self._drop(next(iter(self._expiry)))

    def add_exact(self, name: str, address: str, seconds: float) -> None:
        """Pin one address for exactly `seconds` (at most `max_ttl`), not raised to
        `min_ttl`: a copy of another table's pin (pinshare.py) keeps that pin's expiry."""
        self.add(name, [address], 0)
        key = (name, canonical_ip(address))
        self._expiry[key] = self.clock() + min(max(seconds, 0.0), self.max_ttl)

    def about(self, name: str | None = None, address: str | None = None,
              limit: int = 256) -> list[tuple[str, str, float]]:
        """The live pins of `name` and those of `address`, as (name, address, seconds
        left), at most `limit` of them."""
        keys = [(name, a) for a in self.addresses(name)] if name else []
        if address:
            try:
                a = canonical_ip(address)
            except ValueError:
                a = ""
            keys += [(n, a) for n in self.names_for(a) if n != name] if a else []
        now = self.clock()
        return [(n, a, self._expiry[(n, a)] - now) for n, a in keys[:limit]]

    def addresses(self, name: str) -> list[str]:
        """The live addresses pinned to `name`, oldest pin first."""
        return [a for a in list(self._by_name.get(name, ())) if self._live((name, a))]

    def has(self, name: str, address: str) -> bool:
        try:
            return self._live((name, canonical_ip(address)))
        except ValueError:
            return False

    def names_for(self, address: str) -> list[str]:
        """The names `address` is pinned to (live pins only)."""
        try:
            a = canonical_ip(address)
        except ValueError:
            return []
        return [n for n in list(self._by_address.get(a, ())) if self._live((n, a))]

    def _live(self, key: tuple[str, str]) -> bool:
        until = self._expiry.get(key)
        if until is None:
            return False
        if until <= self.clock():
            self._drop(key)
            return False
        return True

    def _drop(self, key: tuple[str, str]) -> None:
        self._expiry.pop(key, None)
        name, address = key
        for index, k, v in ((self._by_name, name, address), (self._by_address, address, name)):
            entry = index.get(k)
            if entry is not None:
                entry.pop(v, None)
                if not entry:
                    del index[k]
