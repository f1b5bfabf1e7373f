"""Worker 0's pin table shared over a real Unix socket (pinshare.py); no root."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import pytest

from panopticond import pinshare
from panopticond.pins import PinTable


@pytest.fixture
def sock(tmp_path):
    d = tmp_path / "pins"
    d.mkdir(mode=0o700)
    return str(d / "pins.sock")


def run(coro):
    return asyncio.run(coro)


def test_a_miss_is_answered_with_worker_0s_pins_and_their_expiry(sock):
    zero = PinTable(min_ttl=60)
    zero.add("www.example", ["198.51.100.10", "2001:db8::10"], 60)
    zero.add("other.example", ["198.51.100.10"], 60)
    zero.add("unrelated.example", ["198.51.100.99"], 60)
    mine = PinTable(min_ttl=300)

    async def main():
        server = await pinshare.serve(sock, zero)
        try:
            assert await pinshare.share(pinshare.Peer(sock), mine, "www.example", "198.51.100.10")
        finally:
            server.close()
            await server.wait_closed()

    run(main())
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert mine.has("www.example", "198.51.100.10") and mine.has("www.example", "2001:db8::10")
    assert mine.names_for("198.51.100.10") == ["www.example", "other.example"]
    assert not mine.addresses("unrelated.example")  # only what was asked about
    # The copy expires with worker 0's pin (60 s), not after the asker's min_ttl (300 s).
    left = mine.about("www.example")[0][2]
    assert 55 < left <= 60


def test_nothing_pinned_is_an_empty_answer_never_an_error(sock):
    async def main():
        server = await pinshare.serve(sock, PinTable())
        try:
            return await pinshare.Peer(sock).ask("nothing.example", "198.51.100.1")
        finally:
            server.close()

    assert run(main()) == []


def test_an_unreachable_worker_0_is_a_miss(sock, caplog):
    mine = PinTable()
    assert not run(pinshare.share(pinshare.Peer(sock), mine, "www.example", "198.51.100.10"))
    assert len(mine) == 0 and "treating it as a miss" in caplog.text
    # Without a peer (one worker) there is nothing to ask.
    assert run(pinshare.share(None, mine, "www.example", "198.51.100.10"))


def test_a_hung_worker_0_is_given_up_on_in_time(sock):
    async def main():
        async def hang(reader, writer):
            await asyncio.sleep(10)

        server = await asyncio.start_unix_server(hang, sock)
        t = time.monotonic()
        try:
            with pytest.raises(pinshare.PeerUnavailable):
                await pinshare.Peer(sock, timeout=0.3).ask("www.example", None)
        finally:
            server.close()
        return time.monotonic() - t

    assert run(main()) < 2


@pytest.mark.parametrize("question", [b"not json\n", b"[1, 2]\n", b'{"name": 5}\n',
                                      b"x" * 5000 + b"\n", b'{"name": "a"}'])
def test_a_bad_question_gets_nothing_and_the_next_is_answered(sock, question):
    zero = PinTable()
    zero.add("www.example", ["198.51.100.10"], 60)

    async def main():
        server = await pinshare.serve(sock, zero)
        try:
            reader, writer = await asyncio.open_unix_connection(sock)
            writer.write(question)
            if not question.endswith(b"\n"):
                writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            after = await pinshare.Peer(sock).ask("www.example", None)
            return got, after
        finally:
            server.close()

    got, after = run(main())
    assert got == b"" and [(n, a) for n, a, _ in after] == [("www.example", "198.51.100.10")]


def test_a_stale_socket_is_replaced(sock):
    async def main():
        first = await pinshare.serve(sock, PinTable())
        first.close()
        await first.wait_closed()
        zero = PinTable()
        zero.add("www.example", ["198.51.100.10"], 60)
        second = await pinshare.serve(sock, zero)  # a restarted worker 0
        try:
            return await pinshare.Peer(sock).ask(None, "198.51.100.10")
        finally:
            second.close()

    assert [(n, a) for n, a, _ in run(main())] == [("www.example", "198.51.100.10")]


def test_an_answer_that_is_not_an_address_is_never_pinned(sock):
    class Liar(pinshare.Peer):
        async def ask(self, name, address):
            return [("www.example", "not-an-ip", 60.0), ("www.example", "198.51.100.10", 60.0)]

    mine = PinTable()
    assert run(pinshare.share(Liar(sock), mine, "www.example", None))
    assert mine.addresses("www.example") == ["198.51.100.10"]
