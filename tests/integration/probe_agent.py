"""Run as the jailed agent by test_run.py: try every path out, report what happened.

Stdlib only, plus `requests` (the venv's) and the system's curl and node. Prints one JSON
document on stdout: {check name: {...outcome...}}. Every payload that could reach the
simulated internet carries the canary given as argv[1], so the tests can look for it in
the servers' own logs.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

CANARY = sys.argv[1]
SPEC = json.loads(sys.argv[2])  # {"4": {"host": name, "ip": addr, "denied_ip": ...}, "6": {...}}
results: dict = {}


def check(name):
    def wrap(fn):
        t = time.monotonic()
        try:
            out = fn()
            results[name] = {"ok": True, **(out or {})}
        except Exception as e:  # reported, judged by the test
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                             "errno": getattr(e, "errno", None)}
        results[name]["elapsed"] = round(time.monotonic() - t, 3)
        return fn
    return wrap


def curl(*args):
    p = subprocess.run(["curl", "-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}", *args],
                       capture_output=True, text=True, timeout=20)
    body, _, code = p.stdout.rpartition("\n")
    return {"rc": p.returncode, "status": int(code or 0), "body": body[:2000],
            "stderr": p.stderr[-300:]}


def dns_query(server, name, qtype=1, timeout=3.0):
    """A minimal DNS query over UDP; returns (rcode, answer count)."""
    qid = os.getpid() & 0xFFFF
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + struct.pack(">HH", qtype, 1)
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q, (server, 53))
        data, _ = s.recvfrom(4096)
    flags, _qdcount, ancount = struct.unpack(">HHH", data[2:8])
    return {"rcode": flags & 0xF, "answers": ancount}


for fam in ("4", "6"):
    s = SPEC[fam]
    host, ip, denied_ip = s["host"], s["ip"], s["denied_ip"]
    ipl = f"[{ip}]" if fam == "6" else ip

    check(f"curl_https_{fam}")(lambda: curl(f"https://{host}/probe/curl-https-{fam}/{CANARY}"))
    check(f"curl_http_{fam}")(lambda: curl(f"http://{host}/probe/curl-http-{fam}/{CANARY}"))

    @check(f"urllib_https_{fam}")
    def _():
        with urllib.request.urlopen(f"https://{host}/probe/urllib-https-{fam}/{CANARY}",
                                    timeout=10) as r:
            return {"status": r.status, "body": r.read().decode()[:2000]}

    @check(f"urllib_http_{fam}")
    def _():
        with urllib.request.urlopen(f"http://{host}/probe/urllib-http-{fam}/{CANARY}",
                                    timeout=10) as r:
            return {"status": r.status, "body": r.read().decode()[:2000]}

    @check(f"requests_https_{fam}")
    def _():
        import requests

        r = requests.get(f"https://{host}/probe/requests-https-{fam}/{CANARY}", timeout=10)
        return {"status": r.status_code, "body": r.text[:2000]}

    @check(f"node_https_{fam}")
    def _():
        js = ("fetch(process.argv[1]).then(async r => console.log(JSON.stringify("
              "{status: r.status, body: await r.text()}))).catch(e => {"
              "console.log(JSON.stringify({error: String(e.cause || e)})); process.exit(3)})")
        p = subprocess.run(["node", "-e", js, f"https://{host}/probe/node-https-{fam}/{CANARY}"],
                           capture_output=True, text=True, timeout=30)
        out = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}
        if p.returncode != 0:
            raise RuntimeError(f"node exited {p.returncode}: {out} {p.stderr[-300:]}")
        return {"status": out["status"], "body": out["body"][:2000]}

    # A host that is not allowed, reached by an address the agent already knows.
    check(f"denied_https_{fam}")(lambda: curl(
        "--resolve", f"denied.example:443:{denied_ip}",
        f"https://denied.example/probe/denied-https-{fam}/{CANARY}"))
    check(f"denied_http_{fam}")(lambda: curl(
        "--resolve", f"denied.example:80:{denied_ip}",
        f"http://denied.example/probe/denied-http-{fam}/{CANARY}"))
    check(f"denied_lookup_{fam}")(lambda: curl(f"https://denied.example/probe/lookup/{CANARY}"))

    @check(f"direct_tcp_{fam}")
    def _():
        with socket.create_connection((ip, 8080), timeout=5) as c:
            c.sendall(CANARY.encode())
        return {"connected": True}

    check(f"ip_literal_https_{fam}")(lambda: curl("-k", f"https://{ipl}/probe/iplit/{CANARY}"))

    @check(f"udp_{fam}")
    def _():
        errs = []
        for port in (9999, 443, 853):
            af = socket.AF_INET6 if fam == "6" else socket.AF_INET
            with socket.socket(af, socket.SOCK_DGRAM) as u:
                u.settimeout(1)
                try:
                    u.sendto(f"{CANARY}-udp-{port}".encode(), (ip, port))
                    u.recvfrom(100)
                    errs.append(f"{port}: answered")
                except OSError as e:
                    errs.append(f"{port}: {type(e).__name__} {e.errno}")
        return {"outcomes": errs}

    @check(f"icmp_{fam}")
    def _():
        af, proto = (socket.AF_INET6, 58) if fam == "6" else (socket.AF_INET, 1)
        outcomes = []
        for kind in (socket.SOCK_RAW, socket.SOCK_DGRAM):
            try:
                socket.socket(af, kind, proto).close()
                outcomes.append("opened")
            except OSError as e:
                outcomes.append(f"{type(e).__name__} {e.errno}")
        return {"outcomes": outcomes}

    # Any resolver address: the jail's own listener answers (allowed name: an address;
    # the others NXDOMAIN), whether or not anything listens at that address.
    for label, server in (("lab", s["dns"]), ("nowhere", s["nowhere_dns"])):
        check(f"dns_{label}_allowed_{fam}")(
            lambda server=server: dns_query(server, host, qtype=28 if fam == "6" else 1))
        check(f"dns_{label}_denied_{fam}")(
            lambda server=server: dns_query(server, f"{CANARY}.denied.example"))
    check(f"dns_txt_{fam}")(lambda: dns_query(s["dns"], host, qtype=16))

for what, argv in {
    "iptables_flush": ["iptables-legacy", "-F"],
    "ip6tables_flush": ["ip6tables-legacy", "-F"],
    "route_replace": ["ip", "route", "replace", "default", "dev", "lo"],
}.items():
    @check(what)
    def _(argv=argv):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return {"rc": p.returncode, "stderr": p.stderr[-200:]}


@check("sysctl_write")
def _():
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")
    return {"wrote": True}


@check("identity")
def _():
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                     "NoNewPrivs"):
                status[k] = v.strip()
    return {"status": status, "env": dict(os.environ)}


print(json.dumps(results))
