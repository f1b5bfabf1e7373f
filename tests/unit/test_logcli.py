import json
import tomllib

import pytest

from panopticond import logcli, logread
from panopticond.cli import main


def rec(n, host="api.example.com", decision="allow", reason="allowed by api.example.com",
        **kw):
    return {"schema": 1, "time": f"2024-05-01T10:00:{n:02d}.000Z", "kind": "http",
            "instance": "bot", "host": host, "decision": decision, "reason": reason,
            "rule": None, "method": "GET", "path": f"/p{n}", "status": 200, **kw}


@pytest.fixture
def logdir(tmp_path, monkeypatch):
    monkeypatch.setattr(logread, "LOG_DIR", str(tmp_path))
    d = tmp_path / "bot"
    d.mkdir()
    with open(d / "requests.jsonl.1", "w") as f:
        for r in (rec(1), rec(2, host="files.example.com", method="POST")):
            f.write(json.dumps(r) + "\n")
    with open(d / "requests.jsonl", "w") as f:
        f.write(json.dumps(rec(3, host="evil.example", decision="deny",
                               reason="not in the allowlist", status=403)) + "\n")
        f.write("garbage\n")
    return tmp_path


def test_logs_of_an_instance_in_order(logdir, capsys):
    assert main(["logs", "bot", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(x)["path"] for x in out.splitlines()] == ["/p1", "/p2", "/p3"]
    assert "skipped 1 line" in err


def test_logs_filters(logdir, capsys):
    main(["logs", "bot", "--json", "--blocked"])
    assert [json.loads(x)["host"] for x in capsys.readouterr().out.splitlines()] == [
        "evil.example"]
    main(["logs", "bot", "--json", "--host", "*.example.com", "-n", "1"])
    assert [json.loads(x)["path"] for x in capsys.readouterr().out.splitlines()] == ["/p2"]
    main(["logs", "bot", "--json", "--since", "2024-05-01T10:00:02Z"])
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_logs_table_of_every_instance(logdir, capsys):
    other = logdir / "other"
    other.mkdir()
    (other / "requests.jsonl").write_text(json.dumps(rec(0) | {"instance": "other"}) + "\n")
    assert main(["logs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["INSTANCE", "TIME"]
    # Merged by time across instances.
    assert [ln.split()[0] for ln in lines[1:]] == ["other", "bot", "bot", "bot"]


def test_logs_usage_errors(logdir, capsys):
    assert main(["logs", "nobody-here"]) == 64
    assert "instances with a log: bot" in capsys.readouterr().err
    assert main(["logs", "bot", "--since", "whenever"]) == 64
    assert main(["logs", "bot", "--host", "*.*.com"]) == 64
    assert main(["logs", "--file", str(logdir / "missing")]) == 64


def test_suggest(logdir, capsys):
    assert main(["policy", "suggest", "bot"]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out)["allow"] == ["*.example.com", "evil.example"]


def test_suggest_needs_one_instance(logdir, capsys):
    (logdir / "other").mkdir()
    (logdir / "other" / "requests.jsonl").write_text("")
    assert main(["policy", "suggest"]) == 64
    assert "several instances" in capsys.readouterr().err


def test_replay_judges_methods_and_paths_as_enforce_mode(logdir, tmp_path, capsys):
    cand = tmp_path / "candidate.toml"
    cand.write_text('[defaults]\nmode = "discover"\nallow = [\n'
                    '  { host = "*.example.com", methods = ["GET"] },\n]\n')
    assert main(["policy", "replay", "bot", "--config", str(cand)]) == 1
    out, err = capsys.readouterr()
    assert "judging with [defaults]" in err
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:-1]}
    assert set(rows) == {"files.example.com", "evil.example"}
    assert "POST is not allowed" in rows["files.example.com"]
    assert "would block 2 of 3" in out


def test_replay_with_nothing_blocked_exits_0(logdir, tmp_path, capsys):
    cand = tmp_path / "candidate.toml"
    cand.write_text('[defaults]\nallow = ["*.example.com", "evil.example"]\n')
    assert main(["policy", "replay", "--config", str(cand), "--from",
                 str(logdir / "bot" / "requests.jsonl")]) == 0
    assert "would block 0 of 3" in capsys.readouterr().out


def test_run_summary(logdir, capsys):
    logcli.print_run_summary(str(logdir / "bot" / "requests.jsonl"), "bot", 0.0,
                             "allow of [agents.bot]", True)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("panopticon: requests: 2 allowed, 1 blocked; DNS queries: 0 answered, "
                      "0 refused")
    assert "panopticon: to allow: --allow evil.example" in err
    assert 'panopticon: or add to allow of [agents.bot]: "evil.example"' in err
    assert err[-1] == "panopticon: details: panopticon logs bot --blocked"
