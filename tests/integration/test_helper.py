"""The resident helper (helper.py) against the lab: what it adds to `panopticon run`.

test_run.py runs its whole battery through the helper too (its "helper" variant); here
is what only the helper has: warm workers and the forked proxy, the fall-back to the
cold path, the jail's end when its client dies, who may connect, and what the forked
proxy must not inherit from a root process.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

import jailrun as jail
from jailrun import V4_ONLY, VENV_PYTHON
from panopticond import netns

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def work(lab):
    jail.add_lab_names(lab)
    w = jail.Workdir()
    w.write("config.toml", jail.config_text(lab))
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def via(resident_helper):
    """Runs in this test go through the session's helper."""
    jail.HELPER = resident_helper.socket
    try:
        yield resident_helper
    finally:
        jail.HELPER = "off"


def _curl(url: str, *extra: str) -> list[str]:
    return ["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", *extra, url]


def test_a_run_through_the_helper_uses_its_warm_workers(lab, work, via, mark):
    p = jail.run(lab, work.path / "config.toml",
                 _curl(f"https://{V4_ONLY[0]}/through-helper"), "-vv")
    assert p.returncode == 0 and p.stdout == "200", p.stderr
    assert "(resident helper)" in p.stderr
    assert "iptables apply-each: IPv4 warm child, IPv6 warm child" in p.stderr, p.stderr
    assert lab.events(since=mark, path="/through-helper")
    # The same path, denied: blocked, and nothing reaches the server.
    d = jail.run(lab, work.path / "config.toml",
                 _curl("https://denied.example/denied-through-helper", "--resolve",
                       f"denied.example:443:{lab.names['denied.example'][0]}"))
    assert d.stdout == "403", d.stderr
    assert not lab.events(since=mark, path="/denied-through-helper")


def test_without_a_helper_run_takes_the_cold_path(lab, work, resident_helper, mark):
    nobody = str(Path(resident_helper.socket).with_name("nobody-listens.sock"))
    p = jail.run_via(nobody, lab, work.path / "config.toml", _curl(f"https://{V4_ONLY[0]}/cold"),
                     "-v")
    assert p.returncode == 0 and p.stdout == "200", p.stderr
    assert "no resident helper at" in p.stderr and "(resident helper)" not in p.stderr
    # --no-helper: the cold path even with the helper there.
    q = jail.run_via(resident_helper.socket, lab, work.path / "config.toml",
                     _curl(f"https://{V4_ONLY[0]}/no-helper"), "-v", "--no-helper")
    assert q.returncode == 0 and q.stdout == "200", q.stderr
    assert "(resident helper)" not in q.stderr and "ready in" in q.stderr
    assert lab.events(since=mark, path="/cold") and lab.events(since=mark, path="/no-helper")


def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _unix_inode(path: str, pid: int) -> str:
    # /proc/net/unix lists the sockets of a network namespace: the helper's (the lab's
    # simulated host), not this test's.
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        # Accepted connections carry the path too; the listener has __SO_ACCEPTCON.
        if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
            return parts[6]
    raise AssertionError(f"{path} is not a listening Unix socket")


@pytest.mark.parametrize("variant", ["cold", "helper"])
def test_the_proxy_made_ahead_is_the_proxy_user_alone_with_its_ca_key(
        lab, work, resident_helper, variant):
    """A proxy that imported mitmproxy as root before its jail existed (the cold path's
    prestarted one, or forked from the helper): once running, it is the proxy user
    alone, and the ephemeral CA's key, made ahead, is its own."""
    helper = resident_helper.socket if variant == "helper" else "off"
    p = subprocess.Popen(jail.run_argv_via(helper, lab, work.path / "config.toml",
                                           ["sleep", "30"]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    name = jail.instance_of(p.pid)
    try:
        jail.wait_ready(name, p)
        proxy = _the_proxy(name)
        key = Path(f"/run/panopticon/{name}/ca/mitmproxy-ca.pem")
        st = key.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (_proxy_uid(), 0o600)
        assert "BEGIN RSA PRIVATE KEY" in key.read_text()
        exported = Path(f"/run/panopticon/{name}/ca.pem").read_text()
        assert exported.strip() in key.read_text()  # the CA the agent trusts is that one
    finally:
        jail.kill_group(p, signal.SIGTERM)
        p.communicate(timeout=30)
    assert proxy and jail.leftovers(lab, name) == []


def _proxy_uid() -> int:
    return int(subprocess.run(["id", "-u", "panopticon-proxy"], capture_output=True,
                              text=True).stdout)


def _the_proxy(name: str) -> int:
    """The pid of the jail's proxy, checked: the proxy user's alone, with one capability,
    CAP_NET_BIND_SERVICE (its ports are below 1024, out of the agent's reach)."""
    proxy_uid = _proxy_uid()
    pids = netns.pids_in(f"panopticon-{name}")
    proxies = [q for q in pids if int(_proc_status(q)["Uid"].split()[0]) == proxy_uid]
    assert len(proxies) == 1, pids
    st = _proc_status(proxies[0])
    assert st["Uid"].split() == [str(proxy_uid)] * 4 and st["Gid"].split()[0] != "0"
    assert "0" not in st["Gid"].split() and st["Groups"] == ""
    for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[k], 16) == 1 << 10, (k, st[k])  # CAP_NET_BIND_SERVICE alone
    assert st["NoNewPrivs"] == "1"
    return proxies[0]


def test_the_forked_proxy_holds_nothing_of_the_root_helper(lab, work, via):
    p = subprocess.Popen(jail.run_argv(lab, work.path / "config.toml", ["sleep", "30"]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    name = jail.instance_of(p.pid)
    try:
        jail.wait_ready(name, p)
        proxies = [_the_proxy(name)]
        st = _proc_status(proxies[0])
        # Its parent is the jail process (it dies with it: parent-death signal), which
        # is not the helper, and neither holds the helper's listening socket.
        jail_process = int(st["PPid"])
        assert jail_process != via.proc.pid
        listener = _unix_inode(via.socket, via.proc.pid)
        assert listener not in _socket_inodes(proxies[0])
        assert listener not in _socket_inodes(jail_process)
        # The proxy's descriptors: its log, /dev/null, its sockets, pipes of its own
        # event loop; no socket of root's (the helper's clients, the iptables workers').
        helper_sockets = _socket_inodes(via.proc.pid)
        assert not helper_sockets & _socket_inodes(proxies[0])
        # The helper itself is still single-threaded (every fork depends on it).
        assert _proc_status(via.proc.pid)["Threads"] == "1"
    finally:
        jail.kill_group(p, signal.SIGTERM)
        p.communicate(timeout=30)
    assert jail.leftovers(lab, name) == []


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan waits for whoever reaps it here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def test_a_killed_client_takes_its_jail_and_agent_with_it(lab, work, via):
    p = subprocess.Popen(jail.run_argv(lab, work.path / "config.toml", ["sleep", "60"]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    name = jail.instance_of(p.pid)
    try:
        jail.wait_ready(name, p)
        agents = netns.pids_in(f"panopticon-{name}")
        assert agents and jail.leftovers(lab, name)  # the positive control
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        deadline = time.monotonic() + 30
        while jail.leftovers(lab, name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert jail.leftovers(lab, name) == []
        assert not [q for q in agents if _alive(q)]
    finally:
        if p.poll() is None:
            p.kill()
        subprocess.run(lab.in_host([*jail.PANOPTICON_ARGV, "cleanup", "--force", name]),
                       capture_output=True)


def test_only_root_may_connect(lab, resident_helper):
    st = os.stat(resident_helper.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
            "    print(e.errno); sys.exit(0)\nprint('connected')\n")
    # The directory is root's alone too; a copy of the socket's path elsewhere would not
    # help either: the permission is on the socket itself.
    os.chmod(os.path.dirname(resident_helper.socket), 0o755)
    try:
        as_nobody = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup",
                                    "--clear-groups", VENV_PYTHON, "-c", code,
                                    resident_helper.socket],
                                   capture_output=True, text=True, timeout=30)
    finally:
        os.chmod(os.path.dirname(resident_helper.socket), 0o700)
    assert as_nobody.stdout.strip() == "13", as_nobody  # EACCES
    with socket.socket(socket.AF_UNIX) as s:  # the positive control: root connects
        s.connect(resident_helper.socket)


def test_jails_outlive_a_stopped_helper(lab, work, mark):
    with jail.ResidentHelper(lab) as own:
        curl = " ".join(_curl(f"https://{V4_ONLY[0]}/after-helper-stop"))
        p = subprocess.Popen(
            jail.run_argv_via(own.socket, lab, work.path / "config.toml",
                              ["sh", "-c", f"sleep 2; {curl}"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        name = jail.instance_of(p.pid)
        try:
            jail.wait_ready(name, p)
            own.proc.send_signal(signal.SIGTERM)
            own.proc.wait(15)
            assert "1 jail(s) keep running without the helper" in own.log()
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                jail.kill_group(p, signal.SIGKILL)
                p.wait()
        assert p.returncode == 0 and out == "200", err
        assert lab.events(since=mark, path="/after-helper-stop")
        assert jail.leftovers(lab, name) == []
        assert not os.path.exists(own.socket)


@pytest.mark.parametrize("variant", ["cold", "helper"])
def test_runs_at_the_same_time_each_get_their_own_jail(lab, work, resident_helper, mark,
                                                       variant):
    """Several runs at once: their changes to the host's tables take turns (iptables'
    own lock; the kernel refuses a table replaced meanwhile), through the helper those
    without a warm pair start fresh workers, and every run gets its jail, its answer and
    nothing of the others'."""
    via = resident_helper
    helper = via.socket if variant == "helper" else "off"
    procs = [subprocess.Popen(jail.run_argv_via(helper, lab, work.path / "config.toml",
                                                _curl(f"https://{V4_ONLY[0]}/together-{i}")),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    results = [(p.pid, *p.communicate(timeout=120), p.returncode) for p in procs]
    for pid, out, err, rc in results:
        assert rc == 0 and out == "200", err
        assert jail.leftovers(lab, jail.instance_of(pid)) == []
    for i in range(3):
        assert lab.events(since=mark, path=f"/together-{i}")
    assert "ended with status" not in via.log(), via.log()[-3000:]


def _memory_holds(pid: int, needles: list[bytes]) -> dict[bytes, bool]:
    """Which of `needles` occur in the process's writable memory (root reads it)."""
    found = dict.fromkeys(needles, False)
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if "r" not in perms or "w" not in perms:
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            for n in needles:
                found[n] = found[n] or n in chunk
    return found


@pytest.mark.parametrize("variant", ["cold", "helper"])
def test_the_proxy_holds_nothing_of_roots_that_it_does_not_need(lab, work, resident_helper,
                                                                variant):
    """A proxy forked by the helper starts with the memory of the process that built the
    jail: the caller's environment (beyond what the agent gets anyway) and the webhook's
    signing key must never have been there. Checked by reading the proxy's memory; the
    control is a string the proxy must hold (its instance's options path)."""
    canary_env = "pnt" + secrets.token_hex(8)
    canary_key = "pnt" + secrets.token_hex(16)
    key = work.write(f"webhook-{variant}.key", canary_key + "\n", mode=0o600)
    os.chown(key, 0, 0)
    config = work.write(f"mem-{variant}.toml", jail.config_text(lab) + (
        '[webhook]\nurl = "https://www.allowed.example/hook"\n'
        f'secret_file = "{key}"\n'))
    helper = resident_helper.socket if variant == "helper" else "off"
    p = subprocess.Popen(jail.run_argv_via(helper, lab, config, ["sleep", "30"]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True,
                         env={**os.environ, "PNT_CALLER_TOKEN": canary_env})
    name = jail.instance_of(p.pid)
    try:
        jail.wait_ready(name, p)
        proxy = _the_proxy(name)
        control = f"/run/panopticon/{name}/".encode()
        found = _memory_holds(proxy, [canary_env.encode(), canary_key.encode(), control])
    finally:
        jail.kill_group(p, signal.SIGTERM)
        p.communicate(timeout=30)
    assert found[control], "the scan found nothing it should: it proves nothing"
    assert not found[canary_env.encode()], "the caller's environment is in the proxy"
    assert not found[canary_key.encode()], "the webhook's signing key is in the proxy"
