"""Run as the jailed agent by the attack suite: carry out a plan of attacks, report each.

argv: CANARY CONTROL_CANARY PLAN_JSON_FILE. The plan file holds "attacks", a list of
{"id", "kind", "args", "control", "serial"}, and "vars". Every string in "args" has "@T@"
replaced by the attack's tag (CANARY + id for an attack, CONTROL_CANARY + id for a
positive control), so the tests find an attack's bytes (or their absence) anywhere: the
servers' logs, the DNS log, a packet capture; "@RUN@" by the jail's runtime directory,
and "@KEY@" by vars[KEY]. Attacks run in parallel threads, then the serial ones in plan order. Prints one
JSON document, {id: outcome}; an outcome has "ok" (the primitive ran to the end) or
"error" (what stopped it: an exception name, errno and message).

Stdlib, curl and the venv's h2 only: this is what any agent could do.
"""

import base64
import concurrent.futures
import json
import os
import secrets
import socket
import ssl
import struct
import subprocess
import sys
import time

CANARY, CONTROL = sys.argv[1], sys.argv[2]
with open(sys.argv[3]) as f:
    _DOC = json.load(f)
PLAN, VARS = _DOC["attacks"], dict(_DOC["vars"])
VARS["RUN"] = os.path.dirname(os.environ.get("SSL_CERT_FILE", "/run/panopticon/unknown/x"))
TIMEOUT = 3.0


def fill(value, tag):
    if isinstance(value, str):
        value = value.replace("@THEX@", tag.encode().hex()).replace("@T@", tag)
        for k, v in VARS.items():
            value = value.replace(f"@{k}@", str(v))
        return value
    if isinstance(value, list):
        return [fill(v, tag) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, tag) for k, v in value.items()}
    return value


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def addr(host, port):
    """(host, port) for a socket, with a %scope for link-local IPv6."""
    if ":" in host:
        h, _, scope = host.partition("%")
        return socket.getaddrinfo(h + (f"%{scope}" if scope else ""), port, socket.AF_INET6,
                                  socket.SOCK_STREAM)[0][4]
    return (host, port)


def err(e):
    return {"error": f"{type(e).__name__}: {e}", "errno": getattr(e, "errno", None)}


# -- primitives ---------------------------------------------------------------------------

def k_curl(args):
    p = subprocess.run(["curl", "-sS", "-m", str(args.get("timeout", 5)), "-o", "-", "-w",
                        "\n%{http_code}", *args["argv"]], capture_output=True, text=True,
                       timeout=30)
    body, _, code = p.stdout.rpartition("\n")
    return {"rc": p.returncode, "status": int(code or 0), "body": body[:3000],
            "stderr": p.stderr[-300:]}


def k_tcp(args):
    """Connect, optionally wrap in TLS, send the payload, read what comes back."""
    host, port = args["host"], args["port"]
    out = {}
    try:
        raw = socket.socket(family(host), socket.SOCK_STREAM)
        raw.settimeout(args.get("timeout", TIMEOUT))
        raw.connect(addr(host, port))
    except OSError as e:
        return {"connected": False, **err(e)}
    out["connected"] = True
    sock = raw
    try:
        if args.get("tls"):
            ctx = ssl.create_default_context()
            if args.get("insecure"):
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if args.get("alpn"):
                ctx.set_alpn_protocols(args["alpn"])
            sock = ctx.wrap_socket(raw, server_hostname=args.get("sni") or None)
            out["tls"] = True
        for chunk in args.get("chunks", [args.get("payload", "")]):
            sock.sendall(chunk.encode("latin-1"))
            if args.get("pause"):
                time.sleep(args["pause"])
        data = b""
        deadline = time.monotonic() + args.get("read", 2.0)
        while time.monotonic() < deadline:
            try:
                got = sock.recv(65536)
            except TimeoutError:
                break
            if not got:
                break
            data += got
            if args.get("after_101") and b"101" in data.split(b"\r\n", 1)[0] and b"\r\n\r\n" in data:
                sock.sendall(args["after_101"].encode())
                args = {**args, "after_101": None}
        out["reply"] = data[:3000].decode("latin-1")
        out["status"] = _status(data)
    except OSError as e:
        out.update(err(e))
    finally:
        sock.close()
    return out


def _status(data):
    line = data.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) > 1 and line[0].startswith(b"HTTP/") and line[1].isdigit() else 0


def k_udp(args):
    host, port = args["host"], args["port"]
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(args.get("timeout", 1.0))
    try:
        s.connect(addr(host, port))
        s.send(args["payload"].encode())
        try:
            reply = s.recv(4096)
            return {"sent": True, "answered": True, "reply": reply[:200].decode("latin-1")}
        except OSError as e:
            return {"sent": True, "answered": False, **err(e)}
    except OSError as e:
        return {"sent": False, **err(e)}
    finally:
        s.close()


def dns_message(name, qtype):
    q = struct.pack(">HHHHHH", secrets.randbelow(65536), 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        raw = label.encode("latin-1")
        q += bytes([len(raw)]) + raw
    return q + b"\x00" + struct.pack(">HH", qtype, 1)


def k_dns(args):
    server, qtype = args["server"], args.get("qtype", 1)
    q = dns_message(args["name"], qtype)
    try:
        if args.get("tcp"):
            with socket.create_connection((server, 53), timeout=TIMEOUT) as c:
                c.sendall(len(q).to_bytes(2, "big") + q)
                n = int.from_bytes(c.recv(2), "big")
                data = c.recv(n)
        else:
            with socket.socket(family(server), socket.SOCK_DGRAM) as s:
                s.settimeout(TIMEOUT)
                s.sendto(q, addr(server, 53))
                data, _ = s.recvfrom(4096)
    except OSError as e:
        return err(e)
    flags, _qd, ancount = struct.unpack(">HHH", data[2:8])
    return {"rcode": flags & 0xF, "answers": ancount}


def k_dns_many(args):
    rcodes = [k_dns({**args, "name": name}).get("rcode") for name in args["names"]]
    return {"rcodes": rcodes}


def k_socket(args):
    """Open a socket of any kind, and send the payload with it if that worked."""
    fam = getattr(socket, args["family"])
    kind = getattr(socket, args["type"])
    try:
        s = socket.socket(fam, kind, args.get("proto", 0))
    except OSError as e:
        return {"opened": False, **err(e)}
    try:
        s.settimeout(1)
        payload = args.get("payload", "").encode()
        if args.get("icmp_echo"):
            payload = struct.pack(">BBHHH", 8 if fam == socket.AF_INET else 128, 0, 0, 1, 1) + payload
        try:
            s.sendto(payload, (args["host"], args.get("port", 0)))
            return {"opened": True, "sent": True}
        except OSError as e:
            return {"opened": True, "sent": False, **err(e)}
    finally:
        s.close()


def k_exec(args):
    try:
        p = subprocess.run(args["argv"], capture_output=True, text=True, timeout=20,
                           input=args.get("input"))
    except OSError as e:
        return {"rc": None, **err(e)}
    return {"rc": p.returncode, "stdout": p.stdout[-2000:], "stderr": p.stderr[-500:]}


def k_read(args):
    try:
        with open(args["path"], "rb") as f:
            data = f.read(4096)
        return {"read": True, "head": data[:200].decode("latin-1")}
    except OSError as e:
        return {"read": False, **err(e)}


def k_write(args):
    """Try to create a file in each directory; report those where it worked."""
    made, refused = [], {}
    dirs = json.loads(args["dirs"]) if isinstance(args["dirs"], str) else args["dirs"]
    for d in dirs + args.get("more", []):
        path = os.path.join(d, args["name"])
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            made.append(d)
            os.unlink(path)
        except OSError as e:
            refused[d] = type(e).__name__
    return {"made": made, "refused": refused}


def k_unix(args):
    out = {}
    for path in args["paths"]:
        kind = socket.SOCK_DGRAM if args.get("dgram") else socket.SOCK_STREAM
        s = socket.socket(socket.AF_UNIX, kind)
        s.settimeout(2)
        try:
            s.connect(path)
            if args.get("payload"):
                s.sendall(args["payload"].encode())
            out[path] = "connected"
        except OSError as e:
            out[path] = f"{type(e).__name__}"
        finally:
            s.close()
    return {"paths": out}


def k_proc(args):
    """What the agent can do to the processes of another uid (the proxy's)."""
    import signal

    out = {}
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.stat(f"/proc/{p}").st_uid == args["uid"]:
                    pids.append(int(p))
            except OSError:
                pass
    out["pids"] = pids
    attempts = {}
    for pid in pids[:3]:
        for what in ("environ", "mem", "maps", "fd"):
            try:
                if what == "fd":
                    attempts[f"{pid}/fd"] = os.listdir(f"/proc/{pid}/fd")[:3]
                else:
                    with open(f"/proc/{pid}/{what}", "rb") as f:
                        f.read(64)
                    attempts[f"{pid}/{what}"] = "read"
            except OSError as e:
                attempts[f"{pid}/{what}"] = type(e).__name__
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            try:
                os.kill(pid, sig)
                attempts[f"{pid}/kill{int(sig)}"] = "sent"
            except OSError as e:
                attempts[f"{pid}/kill{int(sig)}"] = type(e).__name__
    out["attempts"] = attempts
    return out


def k_status(args):
    st = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            st[k] = v.strip()
    return {"status": st}


CLONE = {"CLONE_NEWUSER": 0x10000000, "CLONE_NEWNET": 0x40000000, "CLONE_NEWNS": 0x00020000}


def k_unshare(args):
    import ctypes

    flags = 0
    for name in args["flags"]:
        flags |= CLONE[name]
    libc = ctypes.CDLL(None, use_errno=True)
    pid = os.fork()
    if pid == 0:  # in a child: a new namespace must not outlive the attempt
        if libc.unshare(flags) == 0:
            os._exit(0)
        os._exit(10 + ctypes.get_errno() % 100)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"unshared": code == 0, "code": code}


def k_h2(args):
    import h2.config
    import h2.connection
    import h2.events

    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection((args["host"], 443), timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname=args["sni"])
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    ids = {}
    for authority, path in args["streams"]:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"),
                                (":authority", authority), (":path", path)], end_stream=True)
        ids[sid] = authority
    tls.sendall(conn.data_to_send())
    alpn = tls.selected_alpn_protocol()
    statuses, done = {}, set()
    tls.settimeout(5)
    try:
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
    except OSError as e:
        return {"alpn": alpn, "statuses": statuses, **err(e)}
    finally:
        tls.close()
    return {"alpn": alpn, "statuses": statuses}


def k_ws(args):
    """A WebSocket client: upgrade, send each message, collect the echoes."""
    key = base64.b64encode(os.urandom(16)).decode()
    host, sni = args["host"], args.get("sni") or args["host"]
    raw = socket.create_connection((args.get("ip") or host, 443 if args.get("tls", True) else 80),
                                   timeout=5)
    sock = ssl.create_default_context().wrap_socket(raw, server_hostname=sni) \
        if args.get("tls", True) else raw
    sock.sendall((f"GET {args['path']} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        got = sock.recv(4096)
        if not got:
            break
        head += got
    status = _status(head)
    echoes = []
    if status == 101:
        for message in args["messages"]:
            data = message.encode()
            mask = os.urandom(4)
            sock.sendall(bytes([0x81, 0x80 | len(data)]) + mask
                         + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
            try:
                frame = sock.recv(4096)
                echoes.append(frame[2:].decode("latin-1"))
            except OSError as e:
                echoes.append(type(e).__name__)
                break
    sock.close()
    return {"status": status, "echoes": echoes}


def k_bind(args):
    """Try to listen where the proxy listens."""
    out = {}
    for host, port, kind in args["targets"]:
        s = socket.socket(family(host), socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        try:
            s.bind((host, port))
            out[f"{host}:{port}/{kind}"] = "bound"
        except OSError as e:
            out[f"{host}:{port}/{kind}"] = type(e).__name__
        finally:
            s.close()
    return {"binds": out}


def k_listening(args):
    """Every TCP port listening in the agent's namespace, then a direct connect to each."""
    found = set()
    for name, fam in (("tcp", "4"), ("tcp6", "6")):
        with open(f"/proc/net/{name}") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A":  # LISTEN
                    hexaddr, hexport = parts[1].split(":")
                    found.add((fam, hexaddr, int(hexport, 16)))
    out = {}
    for fam, hexaddr, port in sorted(found):
        host = "127.0.0.1" if fam == "4" else "::1"
        try:
            with socket.create_connection((host, port), timeout=2) as c:
                c.sendall(args["payload"].encode())
                out[f"{fam}/{port}"] = "connected"
        except OSError as e:
            out[f"{fam}/{port}"] = type(e).__name__
    return {"ports": out}


def k_routes(args):
    p = subprocess.run(["ip", "-j", "route", "show", "default"], capture_output=True, text=True)
    p6 = subprocess.run(["ip", "-j", "-6", "route", "show", "default"], capture_output=True, text=True)
    return {"v4": json.loads(p.stdout or "[]"), "v6": json.loads(p6.stdout or "[]")}


def k_gateway(args):
    """Connect or send to the jail's own gateways (the host's side of the veth)."""
    routes = k_routes({})
    targets = []
    for r in routes["v4"] + routes["v6"]:
        if r.get("gateway"):
            gw = r["gateway"]
            if gw.startswith("fe80"):
                gw = f"{gw}%{r['dev']}"
            targets.append(gw)
    out = {}
    for gw in targets:
        for port in args["tcp"]:
            out[f"tcp {gw} {port}"] = k_tcp({"host": gw, "port": port, "payload": args["payload"],
                                             "read": 0.2, "timeout": 2})
        for port in args["udp"]:
            out[f"udp {gw} {port}"] = k_udp({"host": gw, "port": port, "payload": args["payload"]})
    for r in routes["v6"]:
        if r.get("dev"):
            out[f"udp ff02::1 {r['dev']}"] = k_udp({"host": f"ff02::1%{r['dev']}", "port": 9999,
                                                    "payload": args["payload"]})
            break
    return {"gateways": targets, "results": out}


def k_big_http(args):
    """A large plain-HTTP POST with the payload at its very end."""
    size, tail = args["size"], args["tail"].encode()
    sock = socket.create_connection((args["host"], 80), timeout=10)
    sock.sendall(f"POST {args['path']} HTTP/1.1\r\nHost: {args['host']}\r\n"
                 f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode())
    block, left = b"x" * 65536, size - len(tail)
    try:
        while left > 0:
            n = min(left, len(block))
            sock.sendall(block[:n])
            left -= n
        sock.sendall(tail)
        sock.settimeout(10)
        return {"status": _status(sock.recv(4096))}
    except OSError as e:
        return {"status": 0, **err(e)}
    finally:
        sock.close()


KINDS = {k[2:]: v for k, v in globals().items() if k.startswith("k_")}


def run(attack):
    tag = (CONTROL if attack.get("control") else CANARY) + attack["id"]
    t = time.monotonic()
    try:
        out = KINDS[attack["kind"]](fill(attack["args"], tag))
        out = {"ok": True, **out}
    except Exception as e:  # reported, judged by the test
        out = {"ok": False, **err(e)}
    out["elapsed"] = round(time.monotonic() - t, 3)
    return attack["id"], out


results = {}
parallel = [a for a in PLAN if not a.get("serial")]
with concurrent.futures.ThreadPoolExecutor(12) as pool:
    for key, out in pool.map(run, parallel):
        results[key] = out
for attack in PLAN:
    if attack.get("serial"):
        key, out = run(attack)
        results[key] = out
print(json.dumps(results))
sys.stdout.flush()
# The test looks at the running jail (and attacks it from outside) while the agent waits.
if VARS.get("RESULTS"):
    with open(VARS["RESULTS"] + ".tmp", "w") as f:
        json.dump(results, f)
    os.rename(VARS["RESULTS"] + ".tmp", VARS["RESULTS"])
    deadline = time.monotonic() + 180
    while not os.path.exists(VARS["RELEASE"]) and time.monotonic() < deadline:
        time.sleep(0.05)
os._exit(0)
