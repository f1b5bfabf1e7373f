"""The self-test's probe: run as the agent's uid inside the jail, it tries the ways out.

Standard library only, and self-contained: `selftest.py` hands its source to the
interpreter with `-I -S -c`, so the agent's uid needs no access to the package. Input is
one JSON argument, output one JSON document on stdout, {probe: outcome}; judging the
outcomes is `selftest.judge`'s business, not this script's.

    spec = {"ca": path of the instance CA alone, "allowed": host or null,
            "denied": host or null, "outside": {"4": addr, "6": addr}, "token": str,
            "timeout": seconds}

Every payload carries the token, so that a server that got one (in a test: the lab's)
shows it in its log.
"""

import http.client
import json
import socket
import ssl
import struct
import sys
import threading

SPEC = json.loads(sys.argv[1])
TIMEOUT = float(SPEC.get("timeout", 3))
TOKEN = SPEC["token"]
DENIED = SPEC.get("denied")
results: dict = {}
threads: list = []


def probe(name):
    def wrap(fn):
        def run():
            try:
                results[name] = fn()
            except Exception as e:  # noqa: BLE001 - an outcome to judge, not a crash
                results[name] = {"error": f"{type(e).__name__}: {e}"}
        threads.append(threading.Thread(target=run, daemon=True))
        return fn
    return wrap


def _tls_context():
    # The instance CA alone: only our proxy can complete this handshake. With the system
    # CAs as well, a real server reached directly would pass for it.
    ctx = ssl.create_default_context(cafile=SPEC["ca"])
    ctx.check_hostname = True
    return ctx


def _response(conn, host):
    conn.request("GET", f"/.panopticon-selftest/{TOKEN}", headers={"Host": host,
                 "User-Agent": "panopticon-selftest"})
    r = conn.getresponse()
    return {"status": r.status, "body": r.read(512).decode("utf-8", "replace")}


if SPEC.get("allowed"):
    @probe("allowed")
    def _():
        host = SPEC["allowed"]
        conn = http.client.HTTPSConnection(host, 443, timeout=TIMEOUT, context=_tls_context())
        try:
            return _response(conn, host)
        finally:
            conn.close()


if DENIED:
    @probe("denied_https")
    def _():
        # Straight to an outside address with the denied name as SNI: the REDIRECT must take
        # it to the proxy, which must answer 403 itself.
        fam = "4" if "4" in SPEC["outside"] else "6"
        addr = SPEC["outside"][fam]
        host = DENIED
        raw = socket.create_connection((addr, 443), timeout=TIMEOUT)
        try:
            tls = _tls_context().wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as e:
            raw.close()
            return {"tls_error": str(e)}
        conn = http.client.HTTPSConnection(host, 443, timeout=TIMEOUT)
        conn.sock = tls
        try:
            return _response(conn, host)
        finally:
            conn.close()

    @probe("denied_dns")
    def _():
        try:
            infos = socket.getaddrinfo(DENIED, 443, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            return {"resolved": False, "error": str(e)}
        return {"resolved": True, "addresses": sorted({i[4][0] for i in infos})}


def _family(fam):
    return socket.AF_INET6 if fam == "6" else socket.AF_INET


def _dns_query(addr, fam, name, qtype):
    qid = int.from_bytes(TOKEN.encode()[:2].ljust(2, b"\0"), "big") ^ qtype
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + struct.pack(">HH", qtype, 1)
    with socket.socket(_family(fam), socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        try:
            s.sendto(q, (addr, 53))
            data, _ = s.recvfrom(4096)
        except OSError as e:
            return {"answered": False, "error": f"{type(e).__name__}: {e}"}
    flags, _qd, ancount = struct.unpack(">HHH", data[2:8])
    return {"answered": True, "rcode": flags & 0xF, "answers": ancount}


for fam, addr in SPEC["outside"].items():
    @probe(f"direct_tcp_{fam}")
    def _(fam=fam, addr=addr):
        # 853 (DNS over TLS) on a resolver: a port a real resolver serves and that no rule
        # redirects.
        try:
            with socket.create_connection((addr, 853), timeout=TIMEOUT) as c:
                c.sendall(f"panopticon-selftest {TOKEN}\n".encode())
        except OSError as e:
            return {"connected": False, "error": f"{type(e).__name__}: {e}"}
        return {"connected": True}

    @probe(f"udp_{fam}")
    def _(fam=fam, addr=addr):
        outcomes = {}
        for port in (443, 853):  # QUIC, DNS over QUIC
            with socket.socket(_family(fam), socket.SOCK_DGRAM) as u:
                u.settimeout(min(TIMEOUT, 1.0))
                try:
                    u.sendto(f"panopticon-selftest {TOKEN}".encode(), (addr, port))
                    u.recvfrom(512)
                    outcomes[port] = "answered"
                except OSError as e:
                    outcomes[port] = f"{type(e).__name__}: {e}"
        return {"answered": any(v == "answered" for v in outcomes.values()),
                "outcomes": outcomes}

    @probe(f"dns_{fam}")
    def _(fam=fam, addr=addr):
        # To the resolver itself: the jail answers in its place, denied names NXDOMAIN and
        # other types REFUSED; a real answer means the query got out.
        name = DENIED or "panopticon.invalid"
        return {"a_denied": _dns_query(addr, fam, f"{TOKEN}.{name}", 1),
                "txt_denied": _dns_query(addr, fam, name, 16)}


for t in threads:
    t.start()
for t in threads:
    t.join(TIMEOUT * 3 + 2)
print(json.dumps(results))
