"""Run as the jailed agent by test_workers.py: many new connections through N proxy workers.

Stdlib and the system's curl only. argv: canary, then a JSON spec. Prints one JSON
document: {check name: [outcome, ...]}. Every request carries the canary in its path, so
the tests find it in the simulated internet's own logs.
"""

import json
import socket
import subprocess
import sys

CANARY = sys.argv[1]
SPEC = json.loads(sys.argv[2])
N = SPEC["n"]
results: dict = {}


def curl(url, *args):
    # A new process per request: a new connection each time, verified with the jail's
    # CA bundle (CURL_CA_BUNDLE), so every worker must present the one CA.
    p = subprocess.run(["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                        *args, url], capture_output=True, text=True, timeout=20)
    return {"rc": p.returncode, "status": int(p.stdout or 0), "stderr": p.stderr[-200:]}


def many(name, make):
    results[name] = [make(i) for i in range(N)]


# Resolved through the jail's DNS (worker 0 answers), then served by whichever worker.
for fam, host in (("4", SPEC["v4_host"]), ("6", SPEC["v6_host"]), ("any", SPEC["host"])):
    many(f"resolved_{fam}",
         lambda i, h=host: curl(f"https://{h}/resolved/{i}/{CANARY}"))
# An allowed name the jail's DNS never answered, dialled at an address the agent chose.
many("unresolved_at_agents_address",
     lambda i: curl(f"https://{SPEC['fresh']}/unresolved/{i}/{CANARY}",
                    "--resolve", f"{SPEC['fresh']}:443:{SPEC['denied_ip']}"))
# A name the jail resolved, at another address the agent chose (threat 19).
many("resolved_at_agents_address",
     lambda i: curl(f"https://{SPEC['host']}/spoofed/{i}/{CANARY}",
                    "--resolve", f"{SPEC['host']}:443:{SPEC['denied_ip']}"))
# A denied host, at its real address, on every worker.
many("denied", lambda i: curl(f"https://denied.example/denied/{i}/{CANARY}",
                              "--resolve", f"denied.example:443:{SPEC['denied_ip']}"))


def direct(port):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect(("127.0.0.1", port))
        return {"connected": True}
    except OSError as e:
        return {"connected": False, "error": type(e).__name__}
    finally:
        s.close()


# Every worker's port, straight (not through the REDIRECT): refused.
results["direct_to_worker_ports"] = [direct(p) for p in SPEC["worker_ports"]]
print(json.dumps(results))
