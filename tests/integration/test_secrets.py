"""Secrets the agent never holds, in the lab: swap, tripwires, reflection, DLP, breach.

One jail runs `secrets_agent.py` as the agent. Four secrets, one per source and option:

    LABKEY     file, bound to api.allowed.example, placeholder given by default, exclusive
    RANDKEY    the daemon's environment, "random" placeholder, headers_only
    PLAINKEY   a systemd credential ($CREDENTIALS_DIRECTORY), allow_plaintext, bound to www
    BREACHKEY  file; its real value is "leaked" to the agent, to show a breach is caught

Each check is judged twice: by what the agent got, and by the lab servers' own log (the
bound server sees the real value; the wrong host sees nothing). While the agent waits at
the end, the test looks at the running jail: the proxy's memory high-water mark, its
argv, environment and log, and the secrets file's owner and mode. Then every log and
stderr is searched for the real values.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import jailrun as jail
from jailrun import VENV_PYTHON

pytestmark = pytest.mark.root

AGENT = Path(__file__).with_name("secrets_agent.py")
BOUND, OTHER = "api.allowed.example", "www.allowed.example"
DYN = "dyn.allowed.example"
PH = "PLACEHOLDER_SECRET_VALUE_LABKEY"
MB = 1 << 20
# 200 MB as the issue asks, if the proxy streams it fast enough here; see the report
# printed by test_large_streamed_upload_is_swapped_with_bounded_memory.
BIG = int(os.environ.get("PNT_SECRETS_BIG_MB", "200")) * MB


def url_escape(v: str) -> str:
    from urllib.parse import quote
    return quote(v, safe="-._~")


@pytest.fixture(scope="module")
def values():
    return {
        # Not the placeholder's length: streamed bodies must be re-framed.
        "LABKEY": "lab-" + secrets.token_hex(16) + "/+=x",
        "RANDKEY": "rand-" + secrets.token_hex(20),
        "PLAINKEY": "plain-" + secrets.token_hex(14),
        "BREACHKEY": "breach-" + secrets.token_hex(16),
    }


def secrets_toml(work: Path, creds: str, kill: bool = False) -> str:
    return f'''
[defaults.secrets.LABKEY]
domains = ["{BOUND}"]
file = "{work}/labkey"
env_name = "LAB_API_KEY"
exclusive = true
{'on_tripwire = "kill"' if kill else ''}
[defaults.secrets.RANDKEY]
domains = ["{BOUND}"]
env = "PNT_TEST_RANDKEY"
placeholder = "random"
headers_only = true
env_name = "RAND_KEY"
[defaults.secrets.PLAINKEY]
domains = ["{OTHER}"]
credential = "plainkey"
allow_plaintext = true
env_name = "PLAIN_KEY"
[defaults.secrets.BREACHKEY]
domains = ["{BOUND}"]
file = "{work}/breachkey"
env_name = "BREACH_KEY"
'''


@pytest.fixture(scope="module")
def setup(lab, values):
    w = jail.Workdir()
    creds = tempfile.mkdtemp(prefix="pnt-creds-")  # 0700, root's
    try:
        for name in ("labkey", "breachkey"):
            w.write(name, values[name.upper()] + "\n", mode=0o600)  # in a 0755 directory
        Path(creds, "plainkey").write_text(values["PLAINKEY"])
        os.chmod(Path(creds, "plainkey"), 0o400)
        w.write("leaked.txt", values["BREACHKEY"])
        w.write("secrets_agent.py", AGENT.read_text())
        out_dir = w.path / "out"
        out_dir.mkdir()
        os.chmod(out_dir, 0o777)
        allow = [OTHER, BOUND, f"*.{DYN}"]
        w.write("config.toml", jail.config_text(lab, allow, secrets_toml(w.path, creds)))
        w.write("kill.toml", jail.config_text(lab, allow, secrets_toml(w.path, creds, True)))
        env = {**os.environ, "PNT_TEST_RANDKEY": values["RANDKEY"],
               "CREDENTIALS_DIRECTORY": creds}
        yield {"work": w, "creds": creds, "env": env, "out": out_dir}
    finally:
        w.close()
        shutil.rmtree(creds, ignore_errors=True)


def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


@pytest.fixture(scope="module")
def probe(lab, setup, values):
    w = setup["work"]
    canary = "pnt" + secrets.token_hex(6)
    results_path = setup["out"] / "results.json"
    release = setup["out"] / "release"
    log = w.path / "requests.jsonl"
    spec = {"canary": canary, "bound": BOUND, "other": OTHER, "dyn": DYN,
            "dns": lab.dns_servers[0], "leak_file": str(w.path / "leaked.txt"),
            "secret_file": str(w.path / "labkey"),
            "credential_file": str(Path(setup["creds"], "plainkey")),
            "out": str(results_path), "release": str(release), "big": BIG}
    mark = lab.mark()
    argv = jail.run_argv(lab, w.path / "config.toml",
                         [VENV_PYTHON, str(w.path / "secrets_agent.py"), json.dumps(spec)],
                         "-v", log=log)
    started = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=setup["env"], start_new_session=True)
    name = jail.instance_of(p.pid)
    run_dir = Path(f"/run/panopticon/{name}")
    seen: dict = {}
    try:
        deadline = time.monotonic() + 600
        while not results_path.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the agent did not finish: {p.poll()} "
                                     f"{p.stderr.read() if p.poll() is not None else ''}")
            time.sleep(0.2)
        time.sleep(0.2)
        seen["elapsed"] = time.monotonic() - started
        # The running jail, from the outside.
        proxy_pid = next(int(d) for d in os.listdir("/proc") if d.isdigit()
                         and b"proxy_main" in _read(f"/proc/{d}/cmdline")
                         and str(run_dir).encode() in _read(f"/proc/{d}/cmdline"))
        seen["proxy_status"] = _proc_status(proxy_pid)
        seen["proxy_cmdline"] = _read(f"/proc/{proxy_pid}/cmdline")
        seen["proxy_environ"] = _read(f"/proc/{proxy_pid}/environ")
        seen["proxy_log"] = _read(str(run_dir / "proxy.log"))
        seen["proxy_json"] = _read(str(run_dir / "proxy.json"))
        seen["secrets_stat"] = os.stat(run_dir / "secrets.json")
        seen["proxy_uid"] = int(seen["proxy_status"]["Uid"].split()[0])
        release.touch()
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            jail.kill_group(p, 9)
            p.wait()
            # A run killed leaves its jail (by design): this test must not.
            subprocess.run(lab.in_host([*jail.PANOPTICON_ARGV, "cleanup", "--force", name]),
                           capture_output=True, timeout=60)
    assert p.returncode == 0, err
    return {"results": json.loads(results_path.read_text()), "events": lab.events(since=mark),
            "canary": canary, "stdout": out, "stderr": err, "seen": seen,
            "log": log.read_text(), "records": [json.loads(x) for x in log.read_text()
                                                .splitlines() if x.strip()]}


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _events(probe, prefix):
    return [e for e in probe["events"]
            if (e.get("path") or "").startswith(prefix.replace("CANARY", probe["canary"]))]


def _one(probe, prefix):
    hits = _events(probe, prefix)
    assert len(hits) == 1, (prefix, json.dumps(hits, indent=1)[:3000])
    return hits[0]


def _ok(probe, check, status=200):
    r = probe["results"][check]
    assert r["ok"] and r["status"] == status, r
    return r


# --- the swap ---------------------------------------------------------------------------

def test_header_swap_the_server_sees_the_value_the_agent_the_placeholder(probe, values):
    real = values["LABKEY"]
    r = _ok(probe, "swap_header")
    e = _one(probe, "/swap/header/CANARY")
    assert e["headers"]["authorization"] == f"Bearer {real}"
    assert e["kind"] == "https" and e["sni"] == BOUND
    echoed = json.loads(r["body"])
    assert echoed["headers"]["authorization"] == f"Bearer {PH}"
    assert real not in r["body"]


def test_query_swap_is_url_escaped_and_comes_back_as_the_placeholder(probe, values):
    r = _ok(probe, "swap_query")
    e = _one(probe, "/swap/query/CANARY")
    assert e["path"].endswith("?key=" + url_escape(values["LABKEY"]))
    assert json.loads(r["body"])["path"].endswith(f"?key={PH}")


@pytest.mark.parametrize("check", ["swap_json", "swap_gzip", "swap_br"])
def test_body_swap_also_in_compressed_bodies(probe, values, check):
    r = _ok(probe, check)
    e = _one(probe, f"/swap/{check[5:]}/CANARY")
    assert values["LABKEY"] in e["body"]  # sent decoded: the server reads it plainly
    assert "content-encoding" not in e["headers"]
    assert values["LABKEY"] not in r["body"] and PH in r["body"]


def test_basic_auth_is_swapped_inside_its_base64(probe, values):
    import base64
    r = _ok(probe, "swap_basic")
    e = _one(probe, "/swap/basic/CANARY")
    assert base64.b64decode(e["headers"]["authorization"][6:]).decode() == \
        f"user:{values['LABKEY']}"
    assert json.loads(r["body"])["headers"]["authorization"] == \
        "Basic " + base64.b64encode(f"user:{PH}".encode()).decode()


def test_random_placeholder_headers_only(probe, values):
    env = probe["results"]["reach"]["env"]
    rand = env["RAND_KEY"]
    assert rand.startswith("pnt") and rand != values["RANDKEY"] and len(rand) >= 24
    _ok(probe, "swap_rand")
    assert _one(probe, "/swap/rand/CANARY")["headers"]["x-rand"] == values["RANDKEY"]
    _ok(probe, "rand_body")
    assert _one(probe, "/swap/randbody/CANARY")["body"] == f"k={rand}"  # not in bodies


def test_a_placeholder_split_across_chunks_is_swapped(probe, values):
    _ok(probe, "swap_chunked")
    e = _one(probe, "/swap/chunked/CANARY")
    assert e["body"] == "a" * 100 + values["LABKEY"] + "-end"


def test_plain_http_swaps_only_where_allowed(probe, values):
    r = _ok(probe, "plain_bound", 403)
    assert "LABKEY" in r["body"] and "HTTPS" in r["body"]
    assert not _events(probe, "/plain/bound/CANARY")
    _ok(probe, "plain_swap")
    e = _one(probe, "/plain/swap/CANARY")
    assert e["kind"] == "http" and e["headers"]["x-key"] == values["PLAINKEY"]


# --- tripwires -----------------------------------------------------------------------------

TRIPS = ["header", "query", "path", "body", "b64_0", "b64_1", "b64_2", "basic", "hex",
         "pct_query", "pct_partial", "json", "gzip", "br"]


@pytest.mark.parametrize("label", TRIPS)
def test_a_placeholder_toward_another_host_is_refused_and_logged(probe, label):
    r = _ok(probe, f"trip_{label}", 403)
    assert "LABKEY" in r["body"] and BOUND in r["body"]
    assert not _events(probe, f"/trip/{label}/CANARY")  # the wrong host saw nothing
    trips = [t for t in probe["records"] if t["kind"] == "tripwire" and t["found"] ==
             "placeholder" and t["host"] == OTHER and t["secret"] == "LABKEY"]
    assert trips
    # The positive control: the same request without the placeholder reached it.
    _ok(probe, "trip_control")
    assert _one(probe, "/trip/control/CANARY")["headers"]["x-api-key"] == "nothing"


def test_every_tripwire_has_its_record(probe):
    trips = [t for t in probe["records"] if t["kind"] == "tripwire" and t["host"] == OTHER
             and t["found"] == "placeholder"]
    assert len(trips) == len(TRIPS) + 1, trips  # and the large upload toward it
    assert {t["form"] for t in trips} >= {"plain", "base64", "hex", "percent"}
    denied = [r for r in probe["records"] if r["kind"] == "http"
              and "/trip/" in (r.get("path") or "") and r["decision"] == "deny"]
    assert len(denied) == len(TRIPS)
    assert all(r["reason"].startswith("tripwire") for r in denied)


def test_a_placeholder_in_a_dns_name_is_not_looked_up(probe):
    res = probe["results"]
    assert res["dns_control"]["rcode"] == 3 and res["dns_plain"]["rcode"] == 3
    assert res["dns_hex"]["rcode"] == 3
    names = [e.get("name") or "" for e in probe["events"] if e["kind"] == "dns"]
    assert any(n.startswith(f"ctl-{probe['canary']}") for n in names)  # the control went
    assert not [n for n in names if "placeholder" in n.lower() or PH.encode().hex()[:40] in n]
    dns_trips = [t for t in probe["records"] if t["kind"] == "tripwire" and t["where"] == "dns"]
    assert len(dns_trips) >= 2


# --- breach, DLP -------------------------------------------------------------------------

def test_the_real_value_in_agent_traffic_is_a_breach(probe):
    for check, prefix in (("breach_other", "/breach/other/"), ("breach_bound", "/breach/bound/")):
        _ok(probe, check, 403)
        assert not _events(probe, prefix + "CANARY")
    found = [t for t in probe["records"] if t["kind"] == "tripwire" and t["found"] == "value"]
    assert {t["secret"] for t in found} == {"BREACHKEY"} and len(found) == 2


def test_dlp_blocks_a_credential_shape(probe):
    r = _ok(probe, "dlp", 403)
    assert "github_token" in r["body"]
    assert not _events(probe, "/dlp/CANARY")
    assert [d["pattern"] for d in probe["records"] if d["kind"] == "dlp"] == ["github_token"]


def test_exclusive_refuses_the_agents_own_credential_on_the_domain(probe):
    # (Its positive control: swap_header, the placeholder to the same host, went.)
    r = _ok(probe, "own_credential", 403)
    assert "LABKEY" in r["body"] and "x-api-key" in r["body"]
    assert not _events(probe, "/own/CANARY")  # the bound server saw nothing
    (rec,) = [x for x in probe["records"] if "exclusive" in (x.get("reason") or "")]
    assert rec["decision"] == "deny" and "secret LABKEY" in rec["reason"]
    assert "owntoken" not in probe["log"] and "owntoken" not in probe["stderr"]


# --- what the agent cannot reach, and what never holds a value ----------------------------

def test_the_agent_cannot_read_the_secrets(probe, values):
    reach = probe["results"]["reach"]
    assert reach["ok"], reach
    assert reach["secret_file"].startswith("PermissionError")
    assert reach["credential"].startswith("PermissionError")
    runs = {k: v for k, v in reach.items() if k.startswith("run:")}
    assert runs and all(v.startswith(("PermissionError", "FileNotFoundError"))
                        for v in runs.values()), runs
    assert any(v.startswith("PermissionError") for v in runs.values())
    for what in ("environ", "mem", "maps"):
        assert reach[f"proxy_{what}"].startswith("PermissionError"), reach
    assert reach["env"]["LAB_API_KEY"] == PH and reach["env"]["PLAIN_KEY"] != values["PLAINKEY"]
    assert "BREACH_KEY" in reach["env"] and reach["env"]["BREACH_KEY"] != values["BREACHKEY"]
    seen = probe["seen"]
    st = seen["secrets_stat"]
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == seen["proxy_uid"] != 0


def test_no_real_value_in_any_log_argv_environment_or_error(probe, values):
    seen = probe["seen"]
    places = {
        "request log": probe["log"].encode(),
        "panopticon stderr": probe["stderr"].encode(),
        "stdout": probe["stdout"].encode(),
        "proxy log": seen["proxy_log"],
        "proxy argv": seen["proxy_cmdline"],
        "proxy environment": seen["proxy_environ"],
        "proxy.json": seen["proxy_json"],
        "agent results": json.dumps(probe["results"]).encode(),
    }
    assert seen["proxy_environ"] and seen["proxy_cmdline"]  # really read
    for name, value in values.items():
        if name == "BREACHKEY":
            continue  # the agent was given it on purpose; its results echo it
        forms = {value, url_escape(value)}
        for where, data in places.items():
            for form in forms:
                assert form.encode() not in data, f"{name} in the {where}"
    breach = values["BREACHKEY"].encode()
    for where in ("request log", "panopticon stderr", "proxy log", "proxy argv",
                  "proxy environment", "proxy.json"):
        assert breach not in places[where], f"BREACHKEY in the {where}"
    # Positive control: the names are there.
    assert b"LABKEY" in places["request log"] and b"BREACHKEY" in places["request log"]


# --- large streamed bodies ------------------------------------------------------------------

def test_large_streamed_upload_is_swapped_with_bounded_memory(probe, values):
    r = _ok(probe, "big_bound")
    e = _one(probe, "/big/big_bound/CANARY")
    grown = 2 * (len(values["LABKEY"]) - len(PH))
    assert e["body_length"] == BIG + grown, (e["body_length"], BIG)
    assert "chunked" in e["headers"].get("transfer-encoding", "")
    hwm_kb = int(probe["seen"]["proxy_status"]["VmHWM"].split()[0])
    print(f"\n{BIG // MB} MB upload: {r['elapsed']:.1f} s in the agent; proxy VmHWM "
          f"{hwm_kb // 1024} MB; whole probe {probe['seen']['elapsed']:.0f} s")
    assert hwm_kb < 200 * 1024, f"the proxy peaked at {hwm_kb // 1024} MB"
    # Toward another host the same upload is cut once the placeholder completes.
    other = probe["results"]["big_other"]  # mitmproxy answers 502: "server closed connection"
    assert not other["ok"] or other["status"] != 200, other
    assert not [x for x in _events(probe, "/big/big_other/CANARY") if x.get("status") == 200]
    assert [t for t in probe["records"] if t["kind"] == "tripwire"
            and t["where"] == "body" and t["host"] == OTHER]


# --- kill, check -------------------------------------------------------------------------

def test_on_tripwire_kill_ends_the_agent(lab, setup):
    w = setup["work"]
    log = w.path / "kill.jsonl"
    code = ("import http.client, os, ssl, time\n"
            f"c = http.client.HTTPSConnection('{OTHER}', context=ssl.create_default_context())\n"
            "try:\n"
            "    c.request('GET', '/kill', headers={'X-K': os.environ['LAB_API_KEY']})\n"
            "    print(c.getresponse().status, flush=True)\n"
            "except Exception as e:\n"
            "    print('error', e, flush=True)\n"
            "time.sleep(60)\n"
            "print('survived')\n")
    started = time.monotonic()
    p = subprocess.run(jail.run_argv(lab, w.path / "kill.toml", [VENV_PYTHON, "-c", code],
                                     log=log), capture_output=True, text=True, timeout=120,
                       env=setup["env"])
    assert p.returncode == 137, (p.returncode, p.stderr)
    assert time.monotonic() - started < 45
    # (It may be gone before it has read its 403.)
    assert "survived" not in p.stdout
    assert "ending the agent" in p.stderr
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["action"] for r in recs if r["kind"] == "tripwire"] == ["kill"]


def test_check_validates_sources_without_showing_values(lab, setup, values):
    w = setup["work"]
    argv = [*jail.PANOPTICON_ARGV, "check", "--config"]
    cfg = w.write("check.toml", "[agents.bot]\n" + secrets_toml(w.path, setup["creds"])
                  .replace("[defaults.secrets.", "[agents.bot.secrets."))
    ok = subprocess.run([*argv, str(cfg)], capture_output=True, text=True, env=setup["env"],
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "secret:  LABKEY -> api.allowed.example (file" in ok.stdout and ": ok)" in ok.stdout
    for value in values.values():
        assert value not in ok.stdout + ok.stderr
    os.chmod(w.path / "labkey", 0o644)
    try:
        bad = subprocess.run([*argv, str(cfg)], capture_output=True, text=True,
                             env=setup["env"], timeout=60)
    finally:
        os.chmod(w.path / "labkey", 0o600)
    assert bad.returncode == 3
    assert re.search(rf"{re.escape(str(cfg))}:\d+: agents\.bot\.secrets\.LABKEY\.file: ",
                     bad.stderr), bad.stderr
    assert "chmod 600" in bad.stderr and values["LABKEY"] not in bad.stderr
    # And `run` refuses to start with it, touching nothing.
    os.chmod(w.path / "labkey", 0o644)
    try:
        run = subprocess.run(jail.run_argv(lab, w.path / "config.toml", ["true"]),
                             capture_output=True, text=True, env=setup["env"], timeout=60)
    finally:
        os.chmod(w.path / "labkey", 0o600)
    assert run.returncode == 3 and "defaults.secrets.LABKEY.file" in run.stderr, run.stderr
