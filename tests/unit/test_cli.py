"""The `panopticon` commands that need no root: policy test, check, and the parser.

Nothing here may start a jail: `run`, `cleanup` and `panopticond` are only called where
they stop before any side effect (a usage error, or not being root).
"""

from __future__ import annotations

import json
import os

import pytest

from panopticond import __version__, cli
from panopticond.config import ConfigError
from panopticond.errors import ExitStatus

GOOD = """\
# a config for the CLI tests
[defaults]
allow = ["*.example.com", "203.0.113.7"]
deny = ["bad.example.com"]

[agents.bot]
command = ["curl", "-v", "https://api.example.com/"]
user = "nobody"
allow = ["api.other.test"]
deny = ["*.internal.example.com"]

[agents.idle]
"""

BAD = """\
[defaults]
allow = [
  "ok.test",
  "*.*.com",
]
"""

needs_non_root = pytest.mark.skipif(os.geteuid() == 0,
                                    reason="as root this would start a real jail")


@pytest.fixture
def good(tmp_path) -> str:
    p = tmp_path / "config.toml"
    p.write_text(GOOD)
    return str(p)


@pytest.fixture
def bad(tmp_path) -> str:
    p = tmp_path / "bad.toml"
    p.write_text(BAD)
    return str(p)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --- policy test ------------------------------------------------------------------------------


def test_policy_test_allow(capsys, good):
    rc, out, err = run(capsys, "policy", "test", "--config", good, "https://api.example.com/v1")
    assert rc == 0
    assert out.splitlines() == [
        "ALLOW GET https://api.example.com/v1",
        "  rule: *.example.com",
        "  why:  allowed by *.example.com",
    ]
    assert err == ""


def test_policy_test_deny_names_the_rule(capsys, good):
    rc, out, _ = run(capsys, "policy", "test", "--config", good, "https://bad.example.com/")
    assert rc == 1
    assert out.startswith("DENY GET https://bad.example.com/\n")
    assert "rule: bad.example.com" in out
    assert "denied by bad.example.com" in out


def test_policy_test_default_deny(capsys, good):
    rc, out, _ = run(capsys, "policy", "test", "--config", good, "https://evil.test/")
    assert rc == 1
    assert out.startswith("DENY ")
    assert "rule: (default deny)" in out
    assert "not in the allowlist" in out


@pytest.mark.parametrize(
    ("target", "allowed", "rule"),
    [
        ("example.com", True, "*.example.com"),
        ("https://API.Example.COM./x", True, "*.example.com"),
        ("http://a.example.com:8080/", True, "*.example.com"),
        ("https://badexample.com/", False, "(default deny)"),
        ("https://example.com.evil.test/", False, "(default deny)"),
        ("https://203.0.113.7/", True, "203.0.113.7"),
        ("https://203.0.113.8/", False, "(default deny)"),
        ("https://[2001:db8::1]/", False, "(default deny)"),
        ("https://api.other.test/", False, "(default deny)"),  # only [agents.bot] allows it
    ],
)
def test_policy_test_defaults(capsys, good, target, allowed, rule):
    rc, out, _ = run(capsys, "policy", "test", "--config", good, target)
    assert rc == (0 if allowed else 1)
    assert out.split()[0] == ("ALLOW" if allowed else "DENY")
    assert f"rule: {rule}\n" in out


def test_policy_test_agent_and_method(capsys, good):
    rc, out, _ = run(capsys, "policy", "test", "--config", good, "--agent", "bot",
                     "post", "api.other.test/upload")
    assert rc == 0
    assert out.startswith("ALLOW POST https://api.other.test/upload\n")
    assert "rule: api.other.test" in out
    rc, out, _ = run(capsys, "policy", "test", "--config", good, "--agent", "bot",
                     "https://db.internal.example.com/")
    assert rc == 1
    assert "rule: *.internal.example.com" in out


def test_policy_test_unknown_agent(capsys, good):
    rc, out, err = run(capsys, "policy", "test", "--config", good, "--agent", "bto",
                       "https://a.example.com/")
    assert rc == ExitStatus.CONFIG
    assert out == ""
    assert "no agent 'bto'" in err and "did you mean 'bot'" in err


@pytest.mark.parametrize("target", [["https://"], ["GET", "https://", "x"]])
def test_policy_test_usage_errors(capsys, good, target):
    rc, out, err = run(capsys, "policy", "test", "--config", good, *target)
    assert rc == ExitStatus.USAGE
    assert out == ""
    assert err.startswith("panopticon: error: ")


def test_policy_test_malformed_url(capsys, good):
    rc, _, err = run(capsys, "policy", "test", "--config", good, "https://[2001:db8::1/")
    assert rc == ExitStatus.USAGE
    assert "panopticon: error:" in err


def test_policy_test_bad_config(capsys, bad):
    rc, out, err = run(capsys, "policy", "test", "--config", bad, "https://ok.test/")
    assert rc == ExitStatus.CONFIG
    assert out == ""
    assert f"{bad}:4:" in err


# --- check ----------------------------------------------------------------------------------


def test_check_bad_config_names_file_and_line(capsys, bad):
    rc, out, err = run(capsys, "check", "--config", bad)
    assert rc == 3 == ExitStatus.CONFIG
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith(f"panopticon: error: {bad}:4: defaults.allow[1]: '*.*.com'")
    assert lines[1].startswith("panopticon: hint: ")
    assert "Traceback" not in err


def test_check_invalid_toml(capsys, tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[defaults]\nallow = [\n")
    rc, _, err = run(capsys, "check", "--config", str(p))
    assert rc == ExitStatus.CONFIG
    assert f"{p}:" in err and "invalid TOML" in err


def test_check_missing_config(capsys, tmp_path):
    missing = str(tmp_path / "nope.toml")
    rc, _, err = run(capsys, "check", "--config", missing)
    assert rc == ExitStatus.CONFIG
    assert missing in err and "cannot read the config" in err


def test_check_debug_raises(bad):
    with pytest.raises(ConfigError):
        cli.main(["--debug", "check", "--config", bad])


def test_check_text(capsys, good):
    rc, out, err = run(capsys, "check", "--config", good)
    assert rc == 0
    assert out.startswith(f"{good}: OK, 2 agent(s)\n")
    assert "[agents.bot]" in out and "[agents.idle]" in out
    assert "  allow:   *.example.com, 203.0.113.7, api.other.test" in out
    assert "  deny:    bad.example.com, *.internal.example.com" in out
    assert "  command: curl -v https://api.example.com/" in out
    assert "  user:    (the sudo caller)" in out  # [agents.idle]
    assert err == ""


def test_check_json(capsys, good):
    rc, out, _ = run(capsys, "check", "--config", good, "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["config"] == good
    assert list(doc["agents"]) == ["bot", "idle"]
    assert doc["agents"]["bot"] == {
        "command": ["curl", "-v", "https://api.example.com/"],
        "user": "nobody",
        "allow": ["*.example.com", "203.0.113.7", "api.other.test"],
        "deny": ["bad.example.com", "*.internal.example.com"],
        "ca": "persistent",
        "rules": [], "headers": {}, "addons": [], "mode": "enforce",
        "secrets": [], "dlp": "block", "inbound": {}, "proxy_workers": 1,
    }
    assert doc["agents"]["idle"]["command"] == []
    assert doc["agents"]["idle"]["user"] is None


def test_check_json_one_agent_and_custom_ca(capsys, tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[agents.bot]\nca = { cert = "/etc/pnt/ca.crt", key = "/etc/pnt/ca.key" }\n')
    rc, out, _ = run(capsys, "check", "--config", str(p), "--json", "--agent", "bot")
    assert rc == 0
    doc = json.loads(out)
    assert doc["agents"]["bot"]["ca"] == {"cert": "/etc/pnt/ca.crt", "key": "/etc/pnt/ca.key"}


def test_check_empty_config(capsys, tmp_path):
    p = tmp_path / "empty.toml"
    p.write_text("")
    rc, out, _ = run(capsys, "check", "--config", str(p))
    assert (rc, out) == (0, f"{p}: OK, 0 agent(s)\n")
    rc, out, _ = run(capsys, "check", "--config", str(p), "--json")
    assert json.loads(out) == {"config": str(p), "agents": {}}


def test_check_unknown_agent(capsys, good):
    rc, _, err = run(capsys, "check", "--config", good, "--agent", "nope")
    assert rc == ExitStatus.CONFIG
    assert "no agent 'nope'" in err


# --- parser -----------------------------------------------------------------------------------


def command_of(argv: list[str]) -> list[str]:
    """What `run` executes: REMAINDER keeps the '--', which cmd_run drops."""
    args = cli.build_parser().parse_args(argv)
    assert args.func is cli.cmd_run
    cmd = list(args.command)
    return cmd[1:] if cmd[:1] == ["--"] else cmd


def test_run_keeps_the_commands_own_flags():
    args = cli.build_parser().parse_args(["run", "--", "curl", "-v", "x"])
    assert args.verbose == 0
    assert command_of(["run", "--", "curl", "-v", "x"]) == ["curl", "-v", "x"]


def test_run_options_before_the_separator_are_ours():
    argv = ["run", "-v", "--allow", "a.test", "--deny", "b.test", "--user", "nobody",
            "--env", "A=1", "--", "agent", "--allow", "x", "--user", "root", "-v", "--", "y"]
    args = cli.build_parser().parse_args(argv)
    assert args.verbose == 1
    assert args.allow == ["a.test"] and args.deny == ["b.test"]
    assert args.user == "nobody" and args.env == ["A=1"]
    assert command_of(argv) == ["agent", "--allow", "x", "--user", "root", "-v", "--", "y"]


def test_run_without_separator_and_without_command():
    assert command_of(["run", "curl", "-v", "x"]) == ["curl", "-v", "x"]
    assert command_of(["run", "--agent", "bot"]) == []
    assert command_of(["run", "--", "--", "x"]) == ["--", "x"]


def test_run_without_any_command_is_a_usage_error(capsys, tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[agents.bot]\n")
    for argv in (["run", "--config", str(p), "--"], ["run", "--config", str(p), "--agent", "bot"]):
        rc, out, err = run(capsys, *argv)
        assert rc == ExitStatus.USAGE
        assert out == ""
        assert "no command to run" in err and "hint:" in err


def test_run_as_root_user_is_refused_before_anything(capsys, good):
    rc, _, err = run(capsys, "run", "--config", good, "--user", "root", "--", "true")
    assert rc == ExitStatus.CONFIG
    assert "--user" in err and "'root' is not allowed" in err


@needs_non_root
def test_run_needs_root(capsys, good):
    rc, out, err = run(capsys, "run", "--config", good, "--", "true")
    assert rc == ExitStatus.NOPERM
    assert out == ""
    assert "needs root" in err and "sudo" in err


@needs_non_root
def test_cleanup_needs_root(capsys):
    rc, _, err = run(capsys, "cleanup", "pnt-x")
    assert rc == ExitStatus.NOPERM and "needs root" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"panopticon {__version__}"


@pytest.mark.parametrize("argv", [[], ["run", "--no-such-flag"], ["check", "extra"]])
def test_argparse_errors_exit(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code != 0
    assert "usage:" in capsys.readouterr().err


def test_argparse_errors_exit_with_usage_status():
    with pytest.raises(SystemExit) as info:
        cli.main(["bogus"])
    assert info.value.code == ExitStatus.USAGE


def test_subcommands_help(capsys):
    for argv in (["--help"], ["run", "--help"], ["check", "--help"], ["policy", "test", "--help"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
        assert "usage:" in capsys.readouterr().out


# --- policy test with method/path rules, discover mode, check (issue 3) ------------------------

RULES = """\
[defaults]
allow = ["pypi.org", { host = "api.github.com", methods = ["GET"], paths = ["/repos/acme/*"] }]
headers = { "api.github.com" = { X-Org = "acme-secret-value" } }
addons = ["/etc/panopticon/addons/compliance.py"]

[agents.learner]
mode = "discover"
"""


@pytest.fixture
def rules_cfg(tmp_path) -> str:
    p = tmp_path / "rules.toml"
    p.write_text(RULES)
    return str(p)


@pytest.mark.parametrize(("target", "rc", "first", "why"), [
    (["https://api.github.com/repos/acme/x"], 0, "ALLOW GET", "allowed by api.github.com GET"),
    (["get", "https://api.github.com/repos/acme/x?q=../../other"], 0, "ALLOW GET", "allowed"),
    (["POST", "https://api.github.com/repos/acme/x"], 1, "DENY POST", "POST is not allowed"),
    (["https://api.github.com/repos/other"], 1, "DENY GET", "path is not allowed"),
    (["https://api.github.com/repos/acme/..%2Fother"], 1, "DENY GET", "path is not allowed"),
    (["DELETE", "https://pypi.org/simple/"], 0, "ALLOW DELETE", "allowed by pypi.org"),
])
def test_policy_test_methods_and_paths(capsys, rules_cfg, target, rc, first, why):
    got, out, _ = run(capsys, "policy", "test", "--config", rules_cfg, *target)
    assert got == rc, out
    assert out.startswith(first) and why in out


def test_policy_test_shows_the_normalised_path(capsys, rules_cfg):
    _, out, _ = run(capsys, "policy", "test", "--config", rules_cfg,
                    "https://api.github.com/repos/acme/a/../b")
    assert "path: /repos/acme/b" in out
    _, out, _ = run(capsys, "policy", "test", "--config", rules_cfg,
                    "https://api.github.com/repos/acme/%252e")
    assert "path: (invalid or ambiguous)" in out


def test_policy_test_discover_mode(capsys, rules_cfg):
    rc, out, _ = run(capsys, "policy", "test", "--config", rules_cfg, "--agent", "learner",
                     "https://denied.test/")
    assert rc == 0 and out.startswith("ALLOW (discover mode; enforce would DENY) GET")
    rc, out, _ = run(capsys, "policy", "test", "--config", rules_cfg, "--agent", "learner",
                     "--mode", "enforce", "https://denied.test/")
    assert rc == 1 and out.startswith("DENY GET")
    rc, out, _ = run(capsys, "policy", "test", "--config", rules_cfg, "--mode", "discover",
                     "https://pypi.org/")
    assert rc == 0 and out.startswith("ALLOW GET")  # would allow too: nothing to add


def test_check_shows_rules_headers_addons_and_mode_never_header_values(capsys, rules_cfg):
    rc, out, _ = run(capsys, "check", "--config", rules_cfg)
    assert rc == 0
    assert "rule:    api.github.com GET /repos/acme/*" in out
    assert "headers: api.github.com: X-Org" in out
    assert "addon:   /etc/panopticon/addons/compliance.py" in out
    assert "mode:    discover" in out
    rc, out, _ = run(capsys, "check", "--config", rules_cfg, "--json")
    assert "acme-secret-value" not in out
    assert json.loads(out)["agents"]["learner"]["mode"] == "discover"


def test_run_mode_is_validated_before_anything(capsys, rules_cfg):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--config", rules_cfg, "--mode", "learn", "--", "true"])
    assert e.value.code == ExitStatus.USAGE
