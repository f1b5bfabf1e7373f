"""The agent of `panopticon demo`: probes the jail from inside and prints what it saw.

`panopticon demo` runs it jailed, as an unprivileged user, as

    python -m panopticond.demo_agent --allowed URL --denied NAME --denied-at ADDR...
                                     --direct ADDR:PORT...

It knows nothing of the lab; every name and address comes from the command line. For
each address family (4 and 6; the family of a probe is that of its address) it runs:

    allowed  curl URL                                   expected: 200
    blocked  curl https://NAME/demo, --resolve'd to the  expected: 403 from the proxy, whose
             --denied-at address of that family                   text names NAME and gives
                                                                  a hint how to allow it
    lookup   getaddrinfo(NAME) in that family           expected: NXDOMAIN
    direct   a TCP connection to --direct               expected: refused within 1 s

and prints one JSON document on stdout:

    {"probes": [{"family": 4, "probe": "allowed", "what": "...", "expected": "...",
                 "got": "...", "ok": true, "ms": 12.3, "detail": "..."}, ...]}

`ok` is the probe's own judgement of what the agent saw; whether the internet saw
anything is for the caller to check. `detail` holds the body of the blocked request's
answer, or the error text of a failed probe. Exit status 0 once the document is out,
whatever the probes found; 2 on wrong usage.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

CURL = "/usr/bin/curl"
CONNECT_TIMEOUT = 3  # seconds; the jail answers at once, or not at all
MAX_TIME = 5
FAST = 1.0  # a refusal slower than this is a timeout in disguise


def _family(address: str) -> int:
    return ipaddress.ip_address(address.strip("[]")).version


def _split_hostport(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{target!r} is not ADDR:PORT")
    return host.strip("[]"), int(port)


def _curl(family: int, url: str, *extra: str) -> tuple[int | None, str, str]:
    """(HTTP status or None, body, curl's error text)."""
    argv = [CURL, "-sS", f"-{family}", "--connect-timeout", str(CONNECT_TIMEOUT),
            "--max-time", str(MAX_TIME), "-o", "-", "-w", "\n%{http_code}", *extra, url]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=MAX_TIME + 3)
    except FileNotFoundError:
        return None, "", f"{CURL} not found"
    except subprocess.TimeoutExpired:
        return None, "", f"curl did not finish within {MAX_TIME + 3} s"
    body, _, code = proc.stdout.rpartition("\n")
    if proc.returncode != 0 or not code.isdigit() or code == "000":
        return None, body, proc.stderr.strip() or f"curl exited {proc.returncode}"
    return int(code), body, ""


def probe_allowed(family: int, url: str) -> dict[str, Any]:
    status, _, error = _curl(family, url)
    host = url.split("//", 1)[-1].split("/", 1)[0]
    return {
        "what": f"HTTPS {host} (allowed)",
        "expected": "200",
        "got": str(status) if status is not None else "no answer",
        "ok": status == 200,
        "detail": error,
    }


def probe_blocked(family: int, name: str, address: str) -> dict[str, Any]:
    shown = f"[{address}]" if family == 6 else address
    status, body, error = _curl(family, f"https://{name}/demo",
                                "--resolve", f"{name}:443:{shown}")
    names_host = name in body
    says_how = "allow" in body.lower()
    if status is None:
        got = "no answer"
    elif status == 403 and names_host and says_how:
        got = "403 + hint"
    elif status == 403:
        got = "403, no " + " or ".join(
            w for w, present in (("host", names_host), ("hint", says_how)) if not present)
    else:
        got = str(status)
    return {
        "what": f"HTTPS {name} at {address}",
        "expected": "403 + hint",
        "got": got,
        "ok": status == 403 and names_host and says_how,
        "detail": body.strip() if status is not None else error,
    }


def _with_deadline(fn: Callable[[], Any], seconds: float) -> tuple[str, Any]:
    """("ok", value), ("error", exception) or ("timeout", None); getaddrinfo has no timeout."""
    box: list[tuple[str, Any]] = []

    def run() -> None:
        try:
            box.append(("ok", fn()))
        except Exception as e:  # reported, not raised: the probe's result is the error
            box.append(("error", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return box[0] if box else ("timeout", None)


def probe_lookup(family: int, name: str) -> dict[str, Any]:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    how, value = _with_deadline(
        lambda: socket.getaddrinfo(name, 443, af, socket.SOCK_STREAM), MAX_TIME + 1)
    error = ""
    if how == "ok":
        got = "resolved: " + ", ".join(sorted({a[4][0] for a in value}))
    elif how == "timeout":
        got = "no answer (timeout)"
    elif isinstance(value, socket.gaierror) and value.errno == socket.EAI_NONAME:
        got = "NXDOMAIN"
    elif isinstance(value, socket.gaierror) and value.errno == socket.EAI_AGAIN:
        got, error = "SERVFAIL or timeout", str(value)
    else:
        got, error = "error", str(value)
    return {
        "what": f"DNS lookup {name}",
        "expected": "NXDOMAIN",
        "got": got,
        "ok": got == "NXDOMAIN",
        "detail": error,
    }


def probe_direct(family: int, host: str, port: int) -> dict[str, Any]:
    shown = f"[{host}]:{port}" if family == 6 else f"{host}:{port}"
    started = time.monotonic()
    error, refused, connected = "", False, False
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            connected = True
    except ConnectionRefusedError:
        refused = True
    except TimeoutError:
        error = f"no answer within {CONNECT_TIMEOUT} s"
    except OSError as e:
        error = e.strerror or str(e)
    ms = (time.monotonic() - started) * 1000
    if connected:
        got = "connected"
    elif refused:
        got = f"refused, {ms:.0f} ms"
    else:
        got = error
    return {
        "what": f"TCP {shown} (no proxy)",
        "expected": "refused",
        "got": got,
        "ok": refused and ms < FAST * 1000,
        "detail": error,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    denied_at = {_family(a): a for a in args.denied_at}
    direct = {}
    for target in args.direct:
        host, port = _split_hostport(target)
        direct[_family(host)] = (host, port)
    probes: list[tuple[int, str, Callable[[], dict[str, Any]]]] = []
    for fam in (4, 6):
        probes.append((fam, "allowed", lambda f=fam: probe_allowed(f, args.allowed)))
        if fam in denied_at:
            probes.append((fam, "blocked",
                           lambda f=fam: probe_blocked(f, args.denied, denied_at[f])))
        probes.append((fam, "lookup", lambda f=fam: probe_lookup(f, args.denied)))
        if fam in direct:
            probes.append((fam, "direct", lambda f=fam: probe_direct(f, *direct[f])))
    results = []
    for fam, name, fn in probes:
        started = time.monotonic()
        result = fn()
        results.append({"family": fam, "probe": name, **result,
                        "ms": round((time.monotonic() - started) * 1000, 1)})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m panopticond.demo_agent",
                                description="Probe the jail from inside (panopticon demo).")
    p.add_argument("--allowed", required=True, metavar="URL", help="an allowed HTTPS URL")
    p.add_argument("--denied", required=True, metavar="NAME", help="a host that is not allowed")
    p.add_argument("--denied-at", action="append", default=[], metavar="ADDR",
                   help="NAME's address, one per family")
    p.add_argument("--direct", action="append", default=[], metavar="ADDR:PORT",
                   help="a server to connect to bypassing the proxy, one per family")
    args = p.parse_args(argv)
    try:
        results = run(args)
    except ValueError as e:
        p.error(str(e))
    except KeyboardInterrupt:
        return 130  # `panopticon run` reports the interruption
    json.dump({"probes": results}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
