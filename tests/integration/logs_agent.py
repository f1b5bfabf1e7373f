"""Run as the jailed agent by test_logs.py, in phases the test steps through.

argv: CANARY SIGNAL_DIR DENIED_IP. Prints one JSON document on stdout. Phases:
1. requests to allowed and denied hosts (each path carries the canary), one kept-alive
   HTTPS connection left open; then writes SIGNAL_DIR/phase1 and waits for .../full;
2. (the log's disk is full) a request on the kept-alive connection, and a fresh one;
   writes .../phase2 and waits for .../free;
3. (room again) fresh requests until one gets through (the first may still be refused:
   the log heals on its first successful write).
"""

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

CANARY, SIGNALS, DENIED_IP = sys.argv[1], sys.argv[2], sys.argv[3]
ALLOWED, OTHER, DENIED = "www.allowed.example", "www4.allowed.example", "denied.example"
out: dict = {"phase1": [], "full": {}, "free": []}


def get(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return {"status": r.status}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read(300).decode(errors="replace")}
    except Exception as e:  # reported, judged by the test
        return {"status": None, "error": f"{type(e).__name__}: {e}"}


def signal_and_wait(mine: str, theirs: str, timeout: float = 120) -> None:
    with open(os.path.join(SIGNALS, mine), "w"):
        pass
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(SIGNALS, theirs)):
        if time.monotonic() > deadline:
            raise SystemExit(f"no {theirs} signal")
        time.sleep(0.05)


for i in range(30):
    out["phase1"].append(get(f"https://{ALLOWED}/{CANARY}/mark-{i}"))
for i in range(3):
    # The jail's DNS does not answer for a denied name: connect to its address.
    p = subprocess.run(["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                        "--resolve", f"{DENIED}:443:{DENIED_IP}",
                        f"https://{DENIED}/{CANARY}/denied-{i}"],
                       capture_output=True, text=True, timeout=20)
    out["phase1"].append({"status": int(p.stdout or 0), "denied": True})
out["phase1"].append(get(f"https://{OTHER}/{CANARY}/other"))

# A client that does not trust the instance CA (as a pinning one): a failed handshake.
p = subprocess.run(["curl", "-sS", "-m", "10", "-o", "/dev/null", "--cacert",
                    "/etc/ssl/certs/ca-certificates.crt", f"https://{OTHER}/{CANARY}/untrusted"],
                   capture_output=True, text=True, timeout=20)
out["untrusted"] = {"rc": p.returncode, "stderr": p.stderr[-300:]}

conn = http.client.HTTPSConnection(ALLOWED, 443, timeout=10)
conn.request("GET", f"/{CANARY}/keepalive")
resp = conn.getresponse()
resp.read()
out["keepalive"] = resp.status

signal_and_wait("phase1", "full")
try:
    conn.request("GET", f"/{CANARY}/full-keepalive")
    resp = conn.getresponse()
    out["full"]["keepalive"] = {"status": resp.status, "body": resp.read(300).decode()}
except Exception as e:
    out["full"]["keepalive"] = {"status": None, "error": f"{type(e).__name__}: {e}"}
out["full"]["fresh"] = get(f"https://{ALLOWED}/{CANARY}/full-fresh")

signal_and_wait("phase2", "free")
for i in range(10):
    r = get(f"https://{ALLOWED}/{CANARY}/free-{i}")
    out["free"].append(r)
    if r["status"] == 200:
        break
    time.sleep(0.3)
print(json.dumps(out))
