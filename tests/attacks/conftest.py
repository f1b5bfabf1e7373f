"""The attack suite's lab, jails and report.

The lab is tests/integration's (its fixture, imported: one more lab for this directory),
grown with what attacks need: a catch-all on every TCP and UDP port of every address,
services on the simulated host's own addresses, cloud-metadata stand-ins, a "CDN" that
routes by Host, DNS names that rebind, and packet captures on both sides of the
simulated host. `main_run` runs one jail for every attack declared for "main" (see
attacklib.py); `pytest tests/attacks` ends with a table: item, attack, result.
"""

from __future__ import annotations

import json
import os
import contextlib
import tempfile
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))  # jailrun, as the integration tests use it
sys.path.insert(0, str(HERE))

import attacklib as lib  # noqa: E402
import jailrun as jail  # noqa: E402
from tests.integration.conftest import _require_root, lab  # noqa: E402,F401  (fixtures)

from panopticond.lab import Lab  # noqa: E402

pytestmark = pytest.mark.root

AGENT = HERE / "attack_agent.py"
PROXY_UID, PROXY_GID = lib.PROXY_UID, lib.PROXY_GID

from attacklib import (BAD_TARGETS, CDN, CDN_ALLOWED, CDN_SITES, PINNED, REBIND,  # noqa: E402
                       UPLOAD, WWW)

MAIN_ALLOW = [WWW, jail.V4_ONLY[0], jail.V6_ONLY[0], CDN_ALLOWED, "*.wild.example",
              "*.pinned.example"]
MAIN_EXTRA = """passthrough = ["*.pinned.example"]
"""
MAIN_UPLOAD_RULE = f'{{ host = "{UPLOAD[0]}", methods = ["GET"], paths = ["/public/*"] }}'


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "threat(item, attack): the catalogue item a test attacks")


@pytest.fixture(scope="session")
def attack_lab(lab: Lab) -> Lab:
    """The lab with everything the attacks aim at."""
    jail.add_lab_names(lab)
    lab.catch_all()
    lab.serve_host()
    lab.serve_metadata()
    lab.add_cdn(CDN_SITES, *CDN)
    lab.add_name(UPLOAD[0], v4=UPLOAD[1])
    lab.add_name(PINNED[0], v4=PINNED[1])
    for name, (v4, v6, serve) in BAD_TARGETS.items():
        lab.add_name(name, v4=v4, v6=v6, serve=serve, anywhere=True)
    lab.add_name(REBIND, v4=lab.names[WWW][0])
    # The jail asks every upstream server at once (two here): the first pair is public.
    public = (lab.names[WWW][0], None)
    lab.rebind(REBIND, [public, public, ("169.254.169.254", None)])
    return lab


class UnixService:
    """A service on the host listening on a Unix socket (mode 0666, as many are), that
    records what it receives. It stands where a user's session bus lives
    (/run/user/ID/bus): a path of the kind the agent's mount namespace hides."""

    def __init__(self, path: Path | None = None):
        self._made_root = False
        if path is None:
            if not os.path.isdir("/run/user"):
                os.makedirs("/run/user", mode=0o755)
                self._made_root = True
            self._dir = Path(tempfile.mkdtemp(prefix="pnt-", dir="/run/user"))
            os.chmod(self._dir, 0o755)
            path = self._dir / "bus"
        else:
            self._dir = None
        self.path = path
        self.received: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(1)
                try:
                    self.received.append(conn.recv(4096))
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            if self._made_root:
                with contextlib.suppress(OSError):
                    os.rmdir("/run/user")


def _setuid_copy(work: jail.Workdir) -> dict[str, str]:
    """Binaries that would lift an agent without no_new_privs and an empty bounding set:
    a setuid-root `id` (it prints euid) and a python with CAP_NET_RAW as a file capability."""
    out = {}
    sid = work.path / "suid-id"
    shutil.copy2("/usr/bin/id", sid)
    os.chown(sid, 0, 0)
    os.chmod(sid, 0o4755)
    out["SUID_ID"] = str(sid)
    py = work.path / "capnetraw-python"
    shutil.copy2(os.path.realpath(jail.VENV_PYTHON), py)
    os.chmod(py, 0o755)
    # vfs_cap_data v2: magic|effective, permitted (CAP_NET_RAW = 13), inheritable, high words.
    os.setxattr(py, "security.capability",
                (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little")
                + bytes(12))
    out["CAP_PYTHON"] = str(py)
    return out


def _proxy_paths() -> list[str]:
    """Directories the proxy loads code or configuration from (its sys.path, the venv)."""
    code = "import json, sys; print(json.dumps([p for p in sys.path if p]))"
    p = subprocess.run(["env", f"PYTHONPATH={jail.REPO}", jail.VENV_PYTHON, "-c", code],
                       capture_output=True, text=True, check=True)
    dirs = [d for d in json.loads(p.stdout) if os.path.isdir(d)]
    dirs += [os.path.join(jail.REPO, "panopticond"), os.path.join(jail.REPO, "panopticond", "addons"),
             os.path.dirname(jail.VENV_PYTHON), "/etc/panopticon", "/var/lib/panopticon"]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def run_jail(lab: Lab, jail_name: str, config: str, extra_vars: dict | None = None,
             env: dict | None = None, work: jail.Workdir | None = None) -> lib.Run:
    """One jail, one agent carrying out every attack declared for `jail_name`; the test's
    live checks (`attacklib.live`) run while the agent waits at the end."""
    own_work = work is None
    work = work or jail.Workdir()
    unix = None
    try:
        out = work.path / "out"
        out.mkdir(exist_ok=True)
        os.chmod(out, 0o777)
        unix = UnixService()
        canary, control = "pnt" + secrets.token_hex(4), "ctl" + secrets.token_hex(4)
        vars_ = {"RESULTS": str(out / "results.json"), "RELEASE": str(out / "release"),
                 "UNIX": str(unix.path), "PROXY_UID": PROXY_UID,
                 **(extra_vars or {})}
        plan = {"vars": vars_, "attacks": [a.plan() for a in lib.REGISTRY.get(jail_name, [])]}
        work.write("plan.json", json.dumps(plan))
        work.write("config.toml", config, mode=0o600)  # as /etc/panopticon/config.toml
        work.write("attack_agent.py", AGENT.read_text())
        log = work.path / "requests.jsonl"
        mark = lab.mark()
        net, host = lab.capture("net"), lab.capture("host")
        with net, host:
            argv = jail.run_argv(lab, work.path / "config.toml",
                                 [jail.VENV_PYTHON, str(work.path / "attack_agent.py"), canary,
                                  control, str(work.path / "plan.json")], log=log)
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True, env=env)
            name = jail.instance_of(proc.pid)
            results_path = Path(vars_["RESULTS"])
            live: dict = {}
            try:
                deadline = time.monotonic() + 200
                while not results_path.exists():
                    if proc.poll() is not None:
                        raise AssertionError(f"the jail ended early ({proc.returncode}): "
                                             f"{proc.stderr.read()[-3000:]}")
                    assert time.monotonic() < deadline, "the agent never reported"
                    time.sleep(0.05)
                results = json.loads(results_path.read_text())
                for fn in lib.LIVE.get(jail_name, []):
                    try:
                        live[fn.__name__] = fn(lab, name, canary, control)
                    except Exception as e:  # judged by the test that reads it
                        live[fn.__name__] = {"live_error": f"{type(e).__name__}: {e}"}
            finally:
                (out / "release").touch()
                try:
                    stdout, stderr = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    jail.kill_group(proc, 9)
                    stdout, stderr = proc.communicate()
            time.sleep(0.3)  # what is still in flight reaches the servers and captures
        live["unix_received"] = [b.decode("latin-1") for b in unix.received]
        log_text = log.read_text() if log.exists() else ""
        records = []
        for line in log_text.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"_invalid": line})
        return lib.Run(canary, control, results, lab.events(since=mark), net.data(),
                       host.data(), records, log_text, stderr, name, live, vars_)
    finally:
        if unix is not None:
            unix.close()
        if own_work:
            work.close()


@pytest.fixture(scope="session", name="run_jail")
def run_jail_fixture():
    """`run_jail` for modules that run a jail of their own."""
    return run_jail


@pytest.fixture(scope="session")
def main_run(attack_lab: Lab) -> Iterator[lib.Run]:
    """The main jail: every attack declared for "main", run once."""
    work = jail.Workdir()
    try:
        extra = _setuid_copy(work)
        extra["PROXY_DIRS"] = json.dumps(_proxy_paths())
        extra["LAB_CA"] = str(attack_lab.ca_cert)
        allow = json.dumps(MAIN_ALLOW)[:-1] + ", " + MAIN_UPLOAD_RULE + "]"
        config = jail.config_text(attack_lab, [], "").replace("allow = []", f"allow = {allow}")
        run = run_jail(attack_lab, "main", config + MAIN_EXTRA, extra, work=work)
        yield run
    finally:
        work.close()


# -- the report ------------------------------------------------------------------------------

_RESULTS: list[tuple[int, str, str]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("threat")
    if marker is None:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            reason = report.wasxfail or ""
            result = ("LEAK (known)" if "LEAK" in reason else "MISSING (known)") \
                if report.skipped else "XPASS"
        elif report.passed:
            result = "held"
        elif report.skipped:
            result = "skipped"
        else:
            result = "FAILED" if report.when == "call" else "ERROR"
        _RESULTS.append((int(marker.args[0]), str(marker.args[1]), result))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("attacks: item, attack, result")
    width = max(len(a) for _, a, _ in _RESULTS)
    for item, name, result in sorted(_RESULTS, key=lambda r: r[0]):
        tr.write_line(f"{item:>3}  {name:<{width}}  {result}")
    counts: dict[str, int] = {}
    for *_, result in _RESULTS:
        counts[result] = counts.get(result, 0) + 1
    tr.write_line("     " + ", ".join(f"{n} {r}" for r, n in sorted(counts.items())))
