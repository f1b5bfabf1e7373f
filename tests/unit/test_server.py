"""server: /healthz served for real on a loopback port."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from panopticond.errors import PanopticonError
from panopticond.server import HealthServer, json_page


def get(url: str, method: str = "GET") -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


@pytest.fixture
def serve():
    servers = []

    def start(pages, host="127.0.0.1"):
        s = HealthServer((host, 0), pages)
        s.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def test_status_and_json_body_follow_the_report(serve):
    state = {"ready": False}
    s = serve({"/healthz": json_page(lambda: (200 if state["ready"] else 503, dict(state)))})
    url = f"http://127.0.0.1:{s.port}/healthz"
    code, body, ctype = get(url)
    assert (code, json.loads(body), ctype) == (503, {"ready": False}, "application/json")
    state["ready"] = True
    assert get(url)[:2] == (200, b'{\n "ready": true\n}\n')
    assert get(url + "?x=1")[0] == 200
    assert get(url, "HEAD")[:2] == (200, b"")


def test_unknown_paths_are_404_and_a_broken_page_500_never_200(serve):
    def broken():
        raise RuntimeError("boom")

    s = serve({"/healthz": json_page(broken)})
    assert get(f"http://127.0.0.1:{s.port}/")[0] == 404
    code, body, _ = get(f"http://127.0.0.1:{s.port}/healthz")
    assert code == 500 and b"boom" not in body


def test_ipv6_loopback(serve):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    s = serve({"/healthz": json_page(lambda: (200, {}))}, host="::1")
    assert get(f"http://[::1]:{s.port}/healthz")[0] == 200


def test_a_port_in_use_is_an_operator_error(serve):
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        with pytest.raises(PanopticonError) as e:
            HealthServer(("127.0.0.1", port), {}).start()
        assert f"127.0.0.1:{port}" in str(e.value) and "health" in e.value.hint
    finally:
        taken.close()


def test_close_is_idempotent_and_frees_the_port(serve):
    s = serve({})
    port = s.port
    s.close()
    s.close()
    socket.create_server(("127.0.0.1", port)).close()


def test_query_pages_get_the_query_and_pages_may_add_headers(serve):
    from panopticond.server import page
    s = serve({"/q": page(lambda q: (200, "text/plain", repr(sorted(q.items())).encode(),
                                     {"X-Extra": "1"}), query=True)})
    req = urllib.request.Request(f"http://127.0.0.1:{s.port}/q?a=1&b=x&a=2")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.read() == b"[('a', '2'), ('b', 'x')]"
        assert r.headers["X-Extra"] == "1" and r.headers["X-Content-Type-Options"] == "nosniff"


def test_local_host_header():
    from panopticond.server import local_host_header
    good = ["127.0.0.1", "127.0.0.1:80", "[::1]:9185", "::1", "localhost", "LOCALHOST:1"]
    bad = [None, "", "evil.example", "evil.example:80", "127.0.0.1.nip.io", "[::1"]
    assert all(local_host_header(h) for h in good)
    assert not any(local_host_header(h) for h in bad)
