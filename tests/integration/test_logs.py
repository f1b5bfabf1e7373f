"""The request log end to end: rotation under a real proxy, a full disk, the log commands
(`logs`, `policy suggest`, `policy replay`), the webhook and the summary of `run`.

One jail runs `logs_agent.py` in phases; between them the test fills the log's file
system (a small tmpfs) and frees it again. Every block is paired with its control: the
servers of the simulated internet saw the allowed requests, and nothing of the ones
refused. The webhook receiver listens on the simulated host's loopback, which the agent
cannot reach: the alerts come from the daemon's side.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

import jailrun as jail
from jailrun import VENV_PYTHON

pytestmark = pytest.mark.root

AGENT = Path(__file__).with_name("logs_agent.py")
MAX_BYTES, KEEP = 2048, 200
RECEIVER = r'''
import http.server, json, sys
out = open(sys.argv[2], "a")
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        out.write(json.dumps({"headers": dict(self.headers), "body": body.decode()}) + "\n")
        out.flush()
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
s.serve_forever()
'''


def _wait(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"panopticon ended early ({proc.returncode}): "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"no {path.name}"
        time.sleep(0.05)


def _fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte, as root."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (65536, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def panopticon(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    p = subprocess.run([*jail.PANOPTICON_ARGV, *args], capture_output=True, text=True,
                       timeout=120)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


@pytest.fixture(scope="module")
def run(lab):
    jail.add_lab_names(lab)
    work = jail.Workdir()
    signals = work.path / "signals"
    signals.mkdir(mode=0o777)
    os.chmod(signals, 0o777)
    proxy = pwd.getpwnam("panopticon-proxy")
    logs = Path(tempfile.mkdtemp(prefix="pnt-logs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o",
                    f"size=4m,mode=0750,uid={proxy.pw_uid},gid={proxy.pw_gid}",
                    "pnt-logs", str(logs)], check=True)
    receiver = None
    try:
        key = work.write("webhook.key", secrets.token_hex(16) + "\n", mode=0o600)
        port = 20000 + secrets.randbelow(20000)
        hooks = work.path / "hooks.jsonl"
        work.write("receiver.py", RECEIVER)
        receiver = lab.host_popen([VENV_PYTHON, str(work.path / "receiver.py"), str(port),
                                   str(hooks)], stdout=subprocess.PIPE, text=True)
        assert receiver.stdout.readline().strip() == "ready"
        extra = (f"log_max_bytes = {MAX_BYTES}\nlog_keep = {KEEP}\n"
                 f'[webhook]\nurl = "http://127.0.0.1:{port}/hook"\n'
                 f'secret_file = "{key}"\n')
        work.write("config.toml", jail.config_text(
            lab, allow=["www.allowed.example", "www4.allowed.example"], extra=extra))
        work.write("agent.py", AGENT.read_text())
        canary = "pnt" + secrets.token_hex(6)
        log = logs / "requests.jsonl"
        mark = lab.mark()
        argv = jail.run_argv(lab, work.path / "config.toml",
                             [VENV_PYTHON, str(work.path / "agent.py"), canary, str(signals),
                              lab.names["denied.example"][0]],
                             log=log)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        follow = None
        try:
            _wait(signals / "phase1", proc)
            # `logs --follow` from here on must see every record exactly once.
            follow = subprocess.Popen(
                [*jail.PANOPTICON_ARGV, "logs", "--file", str(log), "--follow", "--json",
                 "--since", "1h"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            filler = _fill(logs)
            (signals / "full").touch()
            _wait(signals / "phase2", proc)
            time.sleep(1)  # the monitor polls the log's state twice a second
            filler.unlink()
            (signals / "free").touch()
            stdout, stderr = proc.communicate(timeout=180)
            time.sleep(1)  # the follower polls four times a second
        finally:
            if proc.poll() is None:
                jail.kill_group(proc, 9)
                proc.wait()
                subprocess.run(lab.in_host([*jail.PANOPTICON_ARGV, "cleanup", "--force",
                                            jail.instance_of(proc.pid)]), timeout=60)
            if follow is not None:
                follow.terminate()
        followed, follow_err = follow.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        files = sorted(logs.glob("requests.jsonl*"))
        yield {
            "results": json.loads(stdout), "stderr": stderr, "canary": canary, "log": log,
            "files": files, "events": lab.events(since=mark), "key": key.read_text().strip(),
            "hooks": [json.loads(x) for x in hooks.read_text().splitlines()]
            if hooks.exists() else [],
            "followed": [json.loads(x) for x in followed.splitlines()],
            "follow_err": follow_err, "proxy": proxy, "copy": _copy(files, work.path),
            "work": work, "leftovers": jail.leftovers(lab, jail.instance_of(proc.pid)),
        }
    finally:
        if receiver is not None:
            receiver.kill()
            receiver.wait()
        subprocess.run(["umount", "-l", str(logs)], check=False)
        shutil.rmtree(logs, ignore_errors=True)
        work.close()


def _copy(files: list[Path], to: Path) -> Path:
    """The logs, copied out of the tmpfs for the commands to read."""
    d = to / "copy"
    d.mkdir()
    for f in files:
        shutil.copy2(f, d / f.name)
    return d / "requests.jsonl"


def _records(run) -> list[dict]:
    out = panopticon("logs", "--file", str(run["copy"]), "--json")
    return [json.loads(x) for x in out.stdout.splitlines()]


def _http(records, canary, suffix):
    return [r for r in records if r.get("kind") == "http"
            and r.get("path", "").startswith(f"/{canary}/{suffix}")]


# -- rotation -----------------------------------------------------------------------

def test_rotated_files_are_bounded_private_and_whole(run):
    assert len(run["files"]) > 3, run["files"]  # it did rotate
    for f in run["files"]:
        st = f.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640, f
        assert (st.st_uid, st.st_gid) == (run["proxy"].pw_uid, run["proxy"].pw_gid), f
        lines = f.read_bytes().splitlines()
        assert st.st_size <= MAX_BYTES or len(lines) == 1, f
        assert all(json.loads(x)["schema"] == 1 for x in lines), f


def test_the_agent_was_allowed_and_refused_as_configured(run):
    phase1 = run["results"]["phase1"]
    assert [r["status"] for r in phase1 if r.get("denied")] == [403] * 3, phase1
    assert all(r["status"] == 200 for r in phase1 if not r.get("denied")), phase1
    assert not [e for e in run["events"] if "/denied-" in (e.get("path") or "")]


def test_a_failed_handshake_is_logged(run):
    assert run["results"]["untrusted"]["rc"] == 60, run["results"]["untrusted"]  # curl: cert
    tls = [r for r in _records(run) if r["kind"] == "tls"]
    assert len(tls) == 1 and tls[0]["host"] == "www4.allowed.example", tls
    assert tls[0]["decision"] == "none" and "trust" in tls[0]["error"]
    assert not [e for e in run["events"] if "/untrusted" in (e.get("path") or "")]


def test_no_record_is_lost_or_repeated_across_rotations(run):
    records = _records(run)
    marks = [r["path"] for r in _http(records, run["canary"], "mark-")]
    assert sorted(marks) == sorted(f"/{run['canary']}/mark-{i}" for i in range(30))
    assert all(r["decision"] == "allow" and r["status"] == 200
               for r in _http(records, run["canary"], "mark-"))
    # The server's log (the oracle) saw each of them once too.
    seen = [e["path"] for e in run["events"] if "/mark-" in (e.get("path") or "")]
    assert sorted(seen) == sorted(marks)


def test_follow_saw_every_record_once(run):
    assert run["followed"], run["follow_err"]
    records = _records(run)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, run["followed"])) == sorted(map(key, records))


# -- a full disk --------------------------------------------------------------------

def test_a_full_disk_refuses_traffic_and_says_so(run):
    full, free = run["results"]["full"], run["results"]["free"]
    assert run["results"]["keepalive"] == 200
    # On the connection that was open: the proxy's own refusal.
    assert full["keepalive"]["status"] == 503, full
    assert "request log is unavailable" in full["keepalive"]["body"]
    # A new request fails already at its DNS lookup (refused as well).
    assert full["fresh"]["status"] != 200, full
    assert not [e for e in run["events"] if "/full-" in (e.get("path") or "")]
    # Positive control: once there is room again, requests get through (the first may
    # still be refused: the log heals on its first successful write).
    assert free[-1]["status"] == 200, free
    assert [e for e in run["events"] if f"/{run['canary']}/free-" in (e.get("path") or "")]


def test_the_full_disk_reached_the_webhook_and_the_journal(run):
    health = [e for h in run["hooks"] for e in json.loads(h["body"])["events"]
              if e["event"] == "health"]
    summaries = [e["summary"] for e in health]
    assert any("request log unavailable" in s for s in summaries), summaries
    assert any("writable again" in s for s in summaries), summaries
    assert "request log unavailable, traffic refused" in run["stderr"]


# -- the webhook --------------------------------------------------------------------

def test_blocks_reach_the_webhook_signed(run):
    assert run["hooks"]
    for h in run["hooks"]:
        expected = "sha256=" + hmac.new(run["key"].encode(), h["body"].encode(),
                                        hashlib.sha256).hexdigest()
        assert h["headers"]["X-Panopticon-Signature"] == expected
        assert json.loads(h["body"])["source"] == "panopticon"
    blocks = [e for h in run["hooks"] for e in json.loads(h["body"])["events"]
              if e["event"] == "block" and e["record"].get("kind") == "http"
              and e["record"].get("host") == "denied.example"]
    assert len(blocks) == 3, blocks
    assert blocks[0]["summary"].startswith("blocked GET denied.example/")
    # Allowed requests are not alerts.
    assert not [e for h in run["hooks"] for e in json.loads(h["body"])["events"]
                if "/mark-" in json.dumps(e)]


# -- the commands -------------------------------------------------------------------

def test_logs_filters_and_table(run):
    f = str(run["copy"])
    blocked = [json.loads(x) for x in
               panopticon("logs", "--file", f, "--json", "--blocked").stdout.splitlines()]
    assert blocked and all(r["decision"] != "allow" for r in blocked)
    assert len(_http(blocked, run["canary"], "denied-")) == 3
    only = [json.loads(x) for x in panopticon(
        "logs", "--file", f, "--json", "--host", "denied.example").stdout.splitlines()]
    assert only and {r.get("host") or r.get("qname") for r in only} == {"denied.example"}
    table = panopticon("logs", "--file", f, "--host", "*.allowed.example", "-n", "5").stdout
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["TIME", "DECISION", "KIND"] and len(lines) == 6
    assert panopticon("logs", "--file", f, "--since", "2000-01-01").stdout.count("\n") > 30
    assert panopticon("logs", "--file", f, "--since", "yesterday-ish",
                      check_rc=64).stderr.startswith("panopticon: error: --since")


def test_suggest_gives_an_allow_list_to_paste(run):
    out = panopticon("policy", "suggest", "--from", str(run["copy"])).stdout
    allow = tomllib.loads(out)["allow"]
    assert allow[0] == "*.allowed.example", out  # two names seen under it
    assert "denied.example" in allow
    assert "www.allowed.example" in out  # named in the comments


def test_replay_shows_what_a_candidate_would_block(run):
    candidate = run["work"].write("candidate.toml", jail.config_text(
        _Lab(), allow=["www.allowed.example"]))
    p = panopticon("policy", "replay", "--config", str(candidate), "--from", str(run["copy"]),
                   check_rc=1)
    rows = {ln.split()[0]: ln for ln in p.stdout.splitlines()[1:-1]}
    assert set(rows) == {"denied.example", "www4.allowed.example"}, p.stdout
    assert "not in the allowlist" in rows["www4.allowed.example"]
    ok = run["work"].write("ok.toml", jail.config_text(
        _Lab(), allow=["*.allowed.example", "denied.example"]))
    assert "would block 0 of" in panopticon("policy", "replay", "--config", str(ok),
                                            "--from", str(run["copy"])).stdout


class _Lab:
    """Enough of a lab for config_text: a candidate config is only read, never run."""

    dns_servers = ["198.51.100.53"]
    ca_cert = "/etc/ssl/certs/ca-certificates.crt"


# -- the summary of run -------------------------------------------------------------

def test_run_ends_with_a_summary_and_how_to_allow(run):
    lines = [ln for ln in run["stderr"].splitlines() if ln.startswith("panopticon: ")]
    assert any(ln.startswith("panopticon: requests: ") and " blocked" in ln
               for ln in lines), lines
    assert "panopticon: to allow: --allow denied.example" in lines, lines
    assert 'panopticon: or add to allow of [defaults]: "denied.example"' in lines, lines
    # The monitor and its state file went with the jail.
    assert run["leftovers"] == []
