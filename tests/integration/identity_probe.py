"""Run as the jailed agent by test_identity.py: every way to talk the proxy into another
destination, and the requests that must still work. Prints {check: outcome} as JSON.

argv: CANARY SPEC_JSON. Every payload that could reach the simulated internet carries
the canary and the check's name, so that the test finds (or misses) it in the servers'
own logs. Stdlib, curl, and the venv's h2 (mitmproxy's dependency).
"""

import json
import os
import secrets
import socket
import ssl
import struct
import subprocess
import sys
import time

CANARY = sys.argv[1]
SPEC = json.loads(sys.argv[2])
results: dict = {}


def check(name):
    def wrap(fn):
        t = time.monotonic()
        try:
            results[name] = {"ok": True, **(fn() or {})}
        except Exception as e:  # reported, judged by the test
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        results[name]["elapsed"] = round(time.monotonic() - t, 3)
        return fn
    return wrap


def path(name):
    return f"/{name}/{CANARY}"


def curl(*args):
    p = subprocess.run(["curl", "-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}", *args],
                       capture_output=True, text=True, timeout=20)
    body, _, code = p.stdout.rpartition("\n")
    return {"rc": p.returncode, "status": int(code or 0), "body": body[:1500],
            "stderr": p.stderr[-300:]}


def dns_query(server, name, qtype=1, timeout=3.0):
    qid = secrets.randbelow(65536)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q, (server, 53))
        data, _ = s.recvfrom(4096)
    flags, _qd, ancount = struct.unpack(">HHH", data[2:8])
    return {"rcode": flags & 0xF, "answers": ancount}


def h2_streams(host, streams):
    """One HTTP/2 connection to `host` (its SNI); one stream per (authority, path)."""
    import h2.config
    import h2.connection
    import h2.events

    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, 443), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname=host)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    ids = {}
    for authority, p in streams:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"),
                                (":authority", authority), (":path", p)], end_stream=True)
        ids[sid] = authority
    tls.sendall(conn.data_to_send())
    statuses, done = {}, set()
    while len(done) < len(ids):
        data = tls.recv(65535)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                statuses[ids[ev.stream_id]] = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                done.add(ev.stream_id)
        tls.sendall(conn.data_to_send())
    alpn = tls.selected_alpn_protocol()
    tls.close()
    return {"alpn": alpn, "statuses": statuses}


DENIED = SPEC["denied"]  # {"4": addr, "6": addr}
WWW = "www.allowed.example"

# 18: plain HTTP with the Host of an allowed name, sent to a denied server's address.
for fam in ("4", "6"):
    check(f"t18_spoofed_host_{fam}")(lambda fam=fam: curl(
        "--resolve", f"{WWW}:80:{DENIED[fam]}", f"http://{WWW}{path('t18-' + fam)}"))
    # 19: the same over TLS: the SNI names an allowed host, the address is the agent's.
    check(f"t19_spoofed_sni_{fam}")(lambda fam=fam: curl(
        "--resolve", f"{WWW}:443:{DENIED[fam]}", f"https://{WWW}{path('t19-' + fam)}"))
check("control_www")(lambda: curl(f"https://{WWW}{path('control-www')}"))

# 20: fronting: SNI of an allowed host, Host of another.
check("t20_fronting_h1")(lambda: curl("-H", "Host: denied.example", "--http1.1",
                                      f"https://{WWW}{path('t20-h1')}"))
check("t20_fronting_allowed_other_h1")(lambda: curl(
    "-H", "Host: api.allowed.example", "--http1.1", f"https://{WWW}{path('t20-h1-api')}"))
# 20, 22: per HTTP/2 stream, one connection: its own name passes, others get 421.
check("t22_h2_streams")(lambda: h2_streams(WWW, [
    (WWW, path("t22-own")), ("denied.example", path("t22-denied")),
    ("api.allowed.example", path("t22-coalesced"))]))

# 23: IP literals (no SNI, no name) and their control, an address the operator allowed.
check("t23_ip_literal_https")(lambda: curl("-k", f"https://{SPEC['www4']}{path('t23-https')}"))
check("t23_ip_literal_http")(lambda: curl(f"http://{SPEC['www4']}{path('t23-http')}"))
check("t23_ip_literal_v6")(lambda: curl("-k", f"https://[{SPEC['www6']}]{path('t23-v6')}"))
check("control_ip_allowed_https")(lambda: curl(f"https://{SPEC['cidr_ip']}{path('t23-ok-https')}"))
check("control_ip_allowed_http")(lambda: curl(f"http://{SPEC['cidr_ip']}{path('t23-ok-http')}"))

# 24: a denied SNI, at a denied address: nothing may be dialled, not even a handshake.
check("t24_denied_sni")(lambda: curl("--resolve", f"denied.example:443:{DENIED['4']}",
                                     f"https://denied.example{path('t24')}"))

# 9, 17: allowed names that resolve to places the proxy must never reach.
for name in SPEC["rebind"]:
    label = name.split(".")[0]
    check(f"t17_dns_{label}")(lambda name=name: dns_query(SPEC["dns"], name,
                                                          28 if "v6" in name else 1))
    # The agent supplies a public address itself: the proxy resolves the name on its own.
    check(f"t17_http_{label}")(lambda name=name, label=label: curl(
        "--resolve", f"{name}:80:{SPEC['www4']}", f"http://{name}{path('t17-' + label)}"))
check("t9_direct_metadata")(lambda: curl(f"http://169.254.169.254{path('t9-meta')}"))
check("t9_direct_host")(lambda: curl(f"http://{SPEC['host_addr']}{path('t9-host')}"))
check("control_inside")(lambda: curl(f"http://inside.example{path('control-inside')}"))

# 16: DoT, DoH, and HTTPS records (ECH).
@check("t16_dot")
def _():
    with socket.create_connection((SPEC["dns"], 853), timeout=5) as c:
        c.sendall(f"dot-{CANARY}".encode())
        c.settimeout(2)
        return {"connected": True, "read": c.recv(100).decode(errors="replace")}


check("t16_doh_post")(lambda: curl(
    "-X", "POST", "-H", "content-type: application/dns-message", "--data-binary", "x",
    f"https://dns.wild.example/dns-query/{CANARY}"))
check("t16_doh_get")(lambda: curl(f"https://dns.wild.example/dns-query?dns=AAAB&c={CANARY}"))
check("control_doh_exact")(lambda: curl(
    "-H", "accept: application/dns-message", f"https://doh.allowed.example{path('doh-ok')}"))
check("t16_https_record")(lambda: dns_query(SPEC["dns"], WWW, 65))
check("t16_svcb_record")(lambda: dns_query(SPEC["dns"], WWW, 64))

# 15: a flood of data-carrying labels under an allowed wildcard.
@check("t15_label_flood")
def _():
    codes = []
    for _ in range(25):
        label = secrets.token_hex(16)
        codes.append(dns_query(SPEC["dns"], f"{label}.flood.wild.example")["rcode"])
    return {"rcodes": codes}


# 27: passthrough: not decrypted (the lab's own certificate reaches the agent), and still
# dialled at the name's address when the agent picks another.
check("t27_passthrough")(lambda: curl("--cacert", SPEC["lab_ca"],
                                      f"https://a.pinned.example{path('t27')}"))
check("t27_passthrough_spoofed")(lambda: curl(
    "--cacert", SPEC["lab_ca"], "--resolve", f"a.pinned.example:443:{DENIED['4']}",
    f"https://a.pinned.example{path('t27-spoofed')}"))
# A host not in passthrough is intercepted: the lab's CA alone does not verify it.
check("t27_others_intercepted")(lambda: curl("--cacert", SPEC["lab_ca"],
                                             f"https://{WWW}{path('t27-intercepted')}"))


# Port rules: { host = "git.example", port = 22 }.
def tcp_send(host, port, tag):
    with socket.create_connection((host, port), timeout=5) as c:
        c.sendall(f"SSH-2.0-probe {tag} {CANARY}\r\n".encode())
        c.settimeout(3)
        try:
            reply = c.recv(200)
        except OSError as e:
            reply = f"{type(e).__name__}".encode()
        return {"connected": True, "reply": reply.decode(errors="replace")[:100]}


check("port_allowed")(lambda: tcp_send("git.example", 22, "port-ok"))
check("port_other_address")(lambda: tcp_send(DENIED["4"], 22, "port-denied"))
check("port_spoofed_pin")(lambda: tcp_send(SPEC["www4"], 22, "port-www"))
check("port_not_ruled")(lambda: tcp_send("git.example", 8080, "port-8080"))

print(json.dumps(results))
sys.stdout.flush()
os._exit(0)
