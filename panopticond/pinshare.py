"""One pin table for several proxy workers: worker 0 answers, the others ask on a miss.

With `proxy_workers = N` the jail's REDIRECT spreads the agent's connections over N
proxies, but only worker 0 runs the DNS listener, so only its pin table (pins.py) learns
which addresses the jail's DNS returned for which name. A worker that judged a request
on its own table alone would, on a miss, dial an address it resolved itself: safe, but
not always the address the agent was given (round-robin names, short TTLs), and a port
rule's raw TCP connection, which can only be judged by the pin of its address, would be
refused. So:

- Worker 0 serves its table on a Unix socket (`serve`). The question is one JSON line,
  {"name": ..., "address": ...}; the answer one line, {"pins": [[name, address,
  seconds left], ...]}: the live pins of that name and of that address.
- Any other worker first looks in its own table; on a miss it asks worker 0 (`Peer.ask`)
  and copies the answer into its table with each pin's own expiry (`PinTable.add_exact`),
  so it asks again for that pair only once the pin would have expired anyway. Misses are
  never cached: a name resolved a moment later must be found.
- No race: worker 0 pins an answer in its `dns_response` hook, before the answer is sent,
  so any connection the agent makes with it finds the pin on whichever worker it lands.
- Fail closed: a question that gets no answer (worker 0 restarting, hung: `TIMEOUT`) is a
  miss, never a hit. The worker then does what a single proxy does on a miss: it dials an
  address it resolves itself, never the one the agent chose; a raw TCP connection is
  refused.

The socket is a path in a directory that only the proxy user may enter (0700, created by
instance.py), never an abstract socket: the agent shares the jail's network namespace,
and with it every abstract socket in it. Other jails' proxies run as the same user and
could ask, but learn nothing they cannot read already (every jail's request log is that
user's), and the protocol only reads: nothing can be pinned through it.

Pure of mitmproxy; asyncio only, run on the proxy's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any

from panopticond.pins import PinTable

logger = logging.getLogger(__name__)

TIMEOUT = 1.0  # for a whole question and its answer; worker 0 answers from memory
MAX_LINE = 1024  # a question: a name (253) and an address
MAX_PINS = 256  # per answer


class PeerUnavailable(Exception):
    """Worker 0 could not be asked, or gave no usable answer."""


async def serve(path: str, table: PinTable) -> asyncio.AbstractServer:
    """Answer questions about `table` on the Unix socket `path` (replacing a stale one)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
            q = json.loads(line) if line.endswith(b"\n") else None
            if not isinstance(q, dict):
                return
            name, address = q.get("name"), q.get("address")
            if not all(v is None or isinstance(v, str) for v in (name, address)):
                return
            pins = table.about(name, address, limit=MAX_PINS)
            writer.write(json.dumps({"pins": [[n, a, round(s, 3)] for n, a, s in pins]})
                         .encode() + b"\n")
            await asyncio.wait_for(writer.drain(), TIMEOUT)
        except (asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError, OSError):
            pass  # a bad or slow asker gets nothing
        except Exception:
            logger.exception("panopticon: answering a pin question failed")
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path, limit=MAX_LINE)
    os.chmod(path, 0o600)
    return server


class Peer:
    """Worker 0, as another worker asks it."""

    def __init__(self, path: str, timeout: float = TIMEOUT):
        self.path = path
        self.timeout = timeout

    async def ask(self, name: str | None, address: str | None) -> list[tuple[str, str, float]]:
        """The live pins worker 0 has for `name` and for `address`; PeerUnavailable if it
        could not be asked."""
        try:
            return await asyncio.wait_for(self._ask(name, address), self.timeout)
        except (asyncio.TimeoutError, OSError, ValueError) as e:
            raise PeerUnavailable(f"{self.path}: {e or type(e).__name__}") from None

    async def _ask(self, name: str | None, address: str | None) -> list[tuple[str, str, float]]:
        reader, writer = await asyncio.open_unix_connection(self.path, limit=64 * 1024)
        try:
            writer.write(json.dumps({"name": name, "address": address}).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
        doc: Any = json.loads(line) if line.endswith(b"\n") else None
        pins = doc.get("pins") if isinstance(doc, dict) else None
        if not isinstance(pins, list):
            raise ValueError("no answer")
        out = []
        for p in pins:
            if (isinstance(p, list) and len(p) == 3 and isinstance(p[0], str)
                    and isinstance(p[1], str) and isinstance(p[2], (int, float))):
                out.append((p[0], p[1], float(p[2])))
        return out


async def share(peer: Peer | None, table: PinTable, name: str | None,
                address: str | None) -> bool:
    """Copy worker 0's pins for `name` and `address` into `table`. False if it could not
    be asked (a miss stays a miss); True without a peer (nothing to ask)."""
    if peer is None:
        return True
    try:
        pins = await peer.ask(name, address)
    except PeerUnavailable as e:
        logger.warning(f"panopticon: worker 0's pin table could not be asked ({e}); "
                       "treating it as a miss")
        return False
    for n, a, seconds in pins:
        try:
            table.add_exact(n, a, seconds)
        except ValueError:
            continue  # not an address: ignored, never pinned
    return True
