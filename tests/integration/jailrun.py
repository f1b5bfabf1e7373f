"""Helpers for tests that run `panopticon run` inside the lab's simulated host."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from panopticond.lab import Lab

VENV_PYTHON = "/opt/panopticon/venv/bin/python"
REPO = str(Path(__file__).resolve().parents[2])
# The code under test is this tree, not an installed copy: the CLI runs from it, and the
# proxy imports the package from wherever the CLI did (proxy.package_root).
# A tree the proxy user cannot read (a clone under /root, say) is tested through the
# copy that scripts/install put into the venv instead (scripts/test installs it first).


def _world_readable(path: str) -> bool:
    p = Path(path)
    for d in [p, *p.parents]:
        if not os.stat(d).st_mode & 0o001:
            return False
    return True


PANOPTICON_ARGV = (["env", f"PYTHONPATH={REPO}", VENV_PYTHON, "-m", "panopticond.cli"]
                   if _world_readable(REPO + "/panopticond") else
                   [shutil.which("panopticon") or "/usr/local/bin/panopticon"])
AGENT_USER = "nobody"

# Names with one family only, so that every client is forced onto that family.
V4_ONLY = ("www4.allowed.example", "198.51.100.12")
V6_ONLY = ("www6.allowed.example", "2001:db8:10::12")
ALLOWED = ["www.allowed.example", V4_ONLY[0], V6_ONLY[0]]


def add_lab_names(lab: Lab) -> None:
    if V4_ONLY[0] not in lab.names:
        lab.add_name(V4_ONLY[0], v4=V4_ONLY[1], v6=None)
    if V6_ONLY[0] not in lab.names:
        lab.add_name(V6_ONLY[0], v4=None, v6=V6_ONLY[1])


class Workdir:
    """A world-readable temporary directory: the agent (nobody) reads its scripts from it."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="pnt-jail-"))
        os.chmod(self.path, 0o755)

    def write(self, name: str, text: str, mode: int = 0o644) -> Path:
        p = self.path / name
        p.write_text(text)
        os.chmod(p, mode)
        return p

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def config_text(lab: Lab, allow: Sequence[str] = ALLOWED, extra: str = "") -> str:
    return (
        "[network]\n"
        f"dns_servers = {json.dumps(list(lab.dns_servers))}\n"
        f'upstream_ca = "{lab.ca_cert}"\n'
        "[defaults]\n"
        f"allow = {json.dumps(list(allow))}\n" + extra
    )


# Where `run` finds the resident helper (helper.py): "off" (the cold path) unless a test
# routes its runs through one (`resident_helper`, and test_run.py's "helper" variant).
# Explicit either way, so that a helper running on the machine never decides for a test.
HELPER = "off"


def run_argv(lab: Lab, config: Path, cmd: Sequence[str], *opts: str,
             user: str | None = AGENT_USER, log: Path | None = None,
             helper: str | None = None) -> list[str]:
    """`helper`: the resident helper's socket for this run, or "off"; default `HELPER`."""
    argv = ["env", f"PANOPTICON_HELPER={helper or HELPER}", *PANOPTICON_ARGV, "run",
            "--config", str(config)]
    if user:
        argv += ["--user", user]
    if log:
        argv += ["--log", str(log)]
    return lab.in_host([*argv, *opts, "--", *cmd])


def run(lab: Lab, config: Path, cmd: Sequence[str], *opts: str, timeout: float = 120,
        **kw) -> subprocess.CompletedProcess:
    return subprocess.run(run_argv(lab, config, cmd, *opts, **kw), capture_output=True,
                          text=True, timeout=timeout)


def run_argv_via(helper: str, lab: Lab, config: Path, cmd: Sequence[str], *opts: str,
                 **kw) -> list[str]:
    """`run_argv` through the resident helper at `helper` (or "off": the cold path)."""
    return run_argv(lab, config, cmd, *opts, helper=helper, **kw)


def run_via(helper: str, lab: Lab, config: Path, cmd: Sequence[str], *opts: str,
            **kw) -> subprocess.CompletedProcess:
    """`run` through the resident helper at `helper` (or "off": the cold path)."""
    return run(lab, config, cmd, *opts, helper=helper, **kw)


def instance_of(pid: int) -> str:
    """The name `panopticon run` gives an ad-hoc jail: run-<its pid> (nsenter execs it)."""
    return f"run-{pid}"


def wait_ready(name: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    """The CA fingerprint file is written just before the agent starts."""
    marker = Path(f"/run/panopticon/{name}/ca.sha256")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists():
            time.sleep(0.2)  # the agent is launched right after
            return
        if proc.poll() is not None:
            raise AssertionError(f"panopticon exited early: {proc.returncode}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError(f"jail {name} not ready within {timeout}s")


def leftovers(lab: Lab, name: str) -> list[str]:
    """Everything of instance `name` that still exists, anywhere it could be."""
    from panopticond.plan import Names

    n = Names.of(name)
    found = []
    if os.path.exists(f"/run/netns/{n.netns}"):
        found.append(f"netns {n.netns}")
    links = subprocess.run(["ip", "-n", lab.host_ns, "-o", "link"], capture_output=True,
                           text=True).stdout
    if n.veth_host in links:
        found.append(f"veth {n.veth_host}")
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        dump = subprocess.run(lab.in_host([tool]), capture_output=True, text=True).stdout
        if f"PANO-{n.tag}" in dump:
            found.append(f"{tool}: PANO-{n.tag}")
    if os.path.exists(n.run_dir):
        found.append(f"run dir {n.run_dir}")
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"/run/panopticon/{name}/".encode() in cmd:
                found.append(f"process {pid}")
    return found


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def ensure_dead(proc: subprocess.Popen) -> Iterator[None]:
    try:
        yield
    finally:
        if proc.poll() is None:
            kill_group(proc, signal.SIGKILL)
            proc.wait()


class ResidentHelper:
    """`panopticon helper` (this tree's) in the lab's simulated host, on a socket of its
    own; its log in `log_path`. `with ResidentHelper(lab) as h: ...`"""

    def __init__(self, lab: Lab, timeout: float = 60) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pnt-helper-"))
        self.socket = str(self.dir / "helper.sock")
        self.log_path = self.dir / "helper.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                lab.in_host([*PANOPTICON_ARGV, "helper", "-vv", "--socket", self.socket]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while "resident helper ready" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"the helper did not start: {self.log()[-2000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                kill_group(self.proc, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ResidentHelper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
