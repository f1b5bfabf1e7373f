"""Run as the jailed agent by test_daemon.py: requests without end, one JSON line each.

Stdlib only. argv: canary, then a JSON spec {"https": [name, ...], "http_ip": [[ip, name], ...]}.
Each round makes one HTTPS request by name (the DNS path) and one plain HTTP request to
an address with a Host header (no DNS: straight at the REDIRECT), alternating families.
Every line carries the request's start on CLOCK_BOOTTIME, the clock of /proc/PID/stat's
start time, so the test can tell which requests started while no proxy existed.
"""

import json
import ssl
import sys
import time
import urllib.request

CANARY = sys.argv[1]
SPEC = json.loads(sys.argv[2])
CTX = ssl.create_default_context()  # SSL_CERT_FILE: the bundle with the instance CA


def now():
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def attempt(n, kind, url, host=None):
    start = now()
    rec = {"n": n, "kind": kind, "url": url, "start": start}
    try:
        req = urllib.request.Request(url, headers={"Host": host} if host else {})
        with urllib.request.urlopen(req, timeout=3, context=CTX if url.startswith("https")
                                    else None) as r:
            rec.update(status=r.status, ok=True)
    except Exception as e:  # noqa: BLE001 - an outcome, reported
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:200],
                   status=getattr(e, "code", None))
    rec["end"] = now()
    print(json.dumps(rec), flush=True)


n = 0
while True:
    for i in range(2):
        n += 1
        name = SPEC["https"][i % len(SPEC["https"])]
        attempt(n, "https", f"https://{name}/traffic/{CANARY}/{n}")
        n += 1
        ip, host = SPEC["http_ip"][i % len(SPEC["http_ip"])]
        literal = f"[{ip}]" if ":" in ip else ip
        attempt(n, "http_ip", f"http://{literal}/traffic/{CANARY}/{n}", host)
    time.sleep(0.05)
