"""Who the agent runs as, what it inherits, and how its exit status is reported.

Users come from this machine's real passwd and group databases ('nobody' exists
everywhere); the proxy uid/gid passed in are chosen not to collide with them unless a
test means them to.
"""

from __future__ import annotations

import grp
import os
import pwd

import pytest

from panopticond import agent
from panopticond.agent import DANGEROUS_GROUPS, AgentUser, build_env, exit_code, resolve_user
from panopticond.errors import ExitStatus, PanopticonError

NOBODY = pwd.getpwnam("nobody")
FREE_ID = 3_999_999_999  # no passwd or group entry has it
PROXY = {"proxy_uid": FREE_ID, "proxy_gid": FREE_ID}


def refused(explicit, environ, **proxy) -> PanopticonError:
    with pytest.raises(PanopticonError) as info:
        resolve_user(explicit, environ, **(proxy or PROXY))
    assert info.value.status == ExitStatus.NOPERM
    assert info.value.hint
    return info.value


def _free_uid() -> int:
    uid = 3_999_999_000
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def _dangerous_group() -> grp.struct_group | None:
    for name in sorted(DANGEROUS_GROUPS):
        try:
            g = grp.getgrnam(name)
        except KeyError:
            continue
        if g.gr_gid != 0:
            return g
    return None


def _user_with_supplementary_groups() -> tuple[pwd.struct_passwd, list[int]] | None:
    for pw in pwd.getpwall():
        if pw.pw_uid == 0 or pw.pw_gid == 0:
            continue
        extra = [g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g not in (0, pw.pw_gid)]
        if extra:
            return pw, extra
    return None


# --- resolve_user -----------------------------------------------------------------------------


def test_root_refused_without_sudo_uid_or_user():
    e = refused(None, {})
    assert "root" in e.message
    assert "--user" in e.hint
    refused(None, {"SUDO_USER": "nobody"})  # only SUDO_UID counts
    refused(None, {"SUDO_UID": ""})
    refused(None, {"SUDO_UID": "nobody"})
    refused(None, {"SUDO_UID": "-1"})
    refused("", {})


@pytest.mark.parametrize("explicit", ["root", "0"])
def test_explicit_root_refused(explicit):
    assert "root" in refused(explicit, {}).message


def test_sudo_from_root_refused():
    assert "root" in refused(None, {"SUDO_UID": "0", "SUDO_GID": "0"}).message


def test_gid_0_refused():
    e = refused(None, {"SUDO_UID": str(NOBODY.pw_uid), "SUDO_GID": "0"})
    assert "gid 0" in e.message


@pytest.mark.parametrize("explicit", ["nobody", str(NOBODY.pw_uid)])
def test_nobody_by_name_or_uid(explicit):
    u = resolve_user(explicit, {}, **PROXY)
    assert u == AgentUser(
        name="nobody", uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, groups=u.groups,
        home=NOBODY.pw_dir, shell=NOBODY.pw_shell,
    )
    assert 0 not in u.groups
    assert set(u.groups) <= set(os.getgrouplist("nobody", NOBODY.pw_gid))


def test_sudo_caller():
    env = {"SUDO_UID": str(NOBODY.pw_uid), "SUDO_GID": str(NOBODY.pw_gid), "SUDO_USER": "x"}
    u = resolve_user(None, env, **PROXY)
    assert (u.name, u.uid, u.gid) == ("nobody", NOBODY.pw_uid, NOBODY.pw_gid)


def test_sudo_caller_without_gid_gets_the_passwd_gid():
    for gid in ("", "x"):
        u = resolve_user(None, {"SUDO_UID": str(NOBODY.pw_uid), "SUDO_GID": gid}, **PROXY)
        assert u.gid == NOBODY.pw_gid


def test_explicit_user_wins_over_sudo_caller():
    u = resolve_user("nobody", {"SUDO_UID": "0", "SUDO_GID": "0"}, **PROXY)
    assert u.uid == NOBODY.pw_uid and u.gid == NOBODY.pw_gid


def test_unknown_user():
    e = refused("pnt-no-such-user", {})
    assert "no such user" in e.message and "pnt-no-such-user" in e.message
    uid = _free_uid()
    assert "no such user" in refused(str(uid), {}).message


def test_sudo_uid_without_passwd_entry():
    uid = _free_uid()
    e = refused(None, {"SUDO_UID": str(uid)})
    assert str(uid) in e.message
    assert "--user" in e.hint


def test_proxy_uid_refused():
    e = refused("nobody", {}, proxy_uid=NOBODY.pw_uid, proxy_gid=FREE_ID)
    assert "proxy user" in e.message
    e = refused(None, {"SUDO_UID": str(NOBODY.pw_uid)}, proxy_uid=NOBODY.pw_uid,
                proxy_gid=FREE_ID)
    assert "proxy user" in e.message


def test_proxy_gid_refused():
    e = refused("nobody", {}, proxy_uid=FREE_ID, proxy_gid=NOBODY.pw_gid)
    assert "proxy user" in e.message


def test_dangerous_sudo_gid_is_refused():
    g = _dangerous_group()
    if g is None:
        pytest.skip("no dangerous group on this machine")
    # sudo passes the caller's gid (e.g. after `newgrp docker`): refused, not kept.
    with pytest.raises(PanopticonError, match="primary group"):
        resolve_user(None, {"SUDO_UID": str(NOBODY.pw_uid), "SUDO_GID": str(g.gr_gid)}, **PROXY)


def test_dangerous_primary_gid_is_refused_or_replaced():
    g = _dangerous_group()
    if g is None:
        pytest.skip("no dangerous group on this machine")
    env = {"SUDO_UID": str(NOBODY.pw_uid), "SUDO_GID": str(g.gr_gid)}
    try:
        u = resolve_user(None, env, **PROXY)
    except PanopticonError:
        return
    assert u.gid != g.gr_gid


def test_supplementary_groups_kept_except_the_proxy_group():
    found = _user_with_supplementary_groups()
    if found is None:
        pytest.skip("no user with supplementary groups on this machine")
    pw, extra = found
    u = resolve_user(pw.pw_name, {}, **PROXY)
    safe = [g for g in extra if _group_name(g) not in DANGEROUS_GROUPS]
    assert set(safe) <= set(u.groups)
    assert pw.pw_gid in u.groups or _group_name(pw.pw_gid) in DANGEROUS_GROUPS
    # The proxy's group is dropped from the supplementary groups.
    u2 = resolve_user(pw.pw_name, {}, proxy_uid=FREE_ID, proxy_gid=extra[0])
    assert extra[0] not in u2.groups
    assert u2.gid == pw.pw_gid


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


def test_dangerous_groups_cover_the_usual_suspects():
    assert {"root", "sudo", "wheel", "docker", "lxd", "libvirt", "disk", "kvm", "shadow",
            "systemd-journal", "adm"} <= DANGEROUS_GROUPS


# --- build_env ------------------------------------------------------------------------------

USER = AgentUser(name="agent", uid=1234, gid=1234, groups=(1234,), home="/home/agent",
                 shell="/bin/bash")
TRUST = {"SSL_CERT_FILE": "/run/panopticon/x/ca-bundle.pem",
         "NODE_EXTRA_CA_CERTS": "/run/panopticon/x/ca.pem"}

CALLER = {
    # passed
    "TERM": "xterm-256color", "COLORTERM": "truecolor", "LANG": "C.UTF-8", "LANGUAGE": "en",
    "TZ": "UTC", "NO_COLOR": "1", "PATH": "/opt/bin:/usr/bin", "LC_ALL": "C.UTF-8",
    "LC_CTYPE": "C.UTF-8",
    # never passed
    "SUDO_USER": "alice", "SUDO_UID": "1000", "SUDO_GID": "1000",
    "SUDO_COMMAND": "/usr/bin/panopticon run -- x", "NOTIFY_SOCKET": "/run/systemd/notify",
    "CREDENTIALS_DIRECTORY": "/run/credentials/panopticon@x.service",
    "PYTHONPATH": "/tmp/evil", "PYTHONSTARTUP": "/tmp/evil.py", "LD_PRELOAD": "/tmp/evil.so",
    "LD_LIBRARY_PATH": "/tmp", "HOME": "/root", "USER": "root", "LOGNAME": "root",
    "SHELL": "/bin/zsh", "MAIL": "/var/mail/root", "SSH_AUTH_SOCK": "/tmp/ssh-x/agent.1",
    "XDG_RUNTIME_DIR": "/run/user/0", "INVOCATION_ID": "abc", "WATCHDOG_USEC": "1000000",
    "LISTEN_FDS": "2", "OPENAI_API_KEY": "sk-real", "https_proxy": "http://proxy:3128",
    "HTTP_PROXY": "http://proxy:3128", "SSL_CERT_FILE": "/etc/caller.pem",
    "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/0/bus", "term": "lower-case is another name",
}


def test_build_env_exact():
    env = build_env(USER, CALLER, TRUST)
    assert env == {
        "TERM": "xterm-256color", "COLORTERM": "truecolor", "LANG": "C.UTF-8", "LANGUAGE": "en",
        "TZ": "UTC", "NO_COLOR": "1", "PATH": "/opt/bin:/usr/bin", "LC_ALL": "C.UTF-8",
        "LC_CTYPE": "C.UTF-8",
        "HOME": "/home/agent", "USER": "agent", "LOGNAME": "agent", "SHELL": "/bin/bash",
        **TRUST,
    }


@pytest.mark.parametrize(
    "name",
    ["SUDO_USER", "SUDO_UID", "SUDO_GID", "SUDO_COMMAND", "NOTIFY_SOCKET",
     "CREDENTIALS_DIRECTORY", "PYTHONPATH", "PYTHONSTARTUP", "LD_PRELOAD", "LD_LIBRARY_PATH",
     "SSH_AUTH_SOCK", "XDG_RUNTIME_DIR", "INVOCATION_ID", "WATCHDOG_USEC", "LISTEN_FDS",
     "OPENAI_API_KEY", "https_proxy", "HTTP_PROXY", "DBUS_SESSION_BUS_ADDRESS", "MAIL"],
)
def test_daemon_and_caller_secrets_do_not_pass(name):
    assert name not in build_env(USER, CALLER, TRUST)


def test_identity_comes_from_the_user_not_the_caller():
    env = build_env(USER, CALLER, {})
    assert (env["HOME"], env["USER"], env["LOGNAME"], env["SHELL"]) == (
        "/home/agent", "agent", "agent", "/bin/bash")


def test_defaults_for_path_and_shell():
    user = AgentUser("agent", 1234, 1234, (), "/home/agent", "")
    env = build_env(user, {"TERM": "dumb"}, {})
    assert env["PATH"] == agent.DEFAULT_PATH
    assert env["SHELL"] == "/bin/sh"
    assert build_env(user, {}, {}) == {
        "PATH": agent.DEFAULT_PATH, "HOME": "/home/agent", "USER": "agent",
        "LOGNAME": "agent", "SHELL": "/bin/sh",
    }


def test_trust_env_wins_over_the_caller():
    env = build_env(USER, CALLER, TRUST)
    assert env["SSL_CERT_FILE"] == TRUST["SSL_CERT_FILE"]
    assert env["NODE_EXTRA_CA_CERTS"] == TRUST["NODE_EXTRA_CA_CERTS"]


def test_extra_wins_over_everything():
    extra = {"HOME": "/srv/agent", "PATH": "/x", "SSL_CERT_FILE": "/mine.pem", "FOO": "bar",
             "TERM": "vt100"}
    env = build_env(USER, CALLER, TRUST, extra)
    for k, v in extra.items():
        assert env[k] == v
    assert env["NODE_EXTRA_CA_CERTS"] == TRUST["NODE_EXTRA_CA_CERTS"]


def test_build_env_does_not_touch_its_inputs():
    caller, trust, extra = dict(CALLER), dict(TRUST), {"A": "1"}
    env = build_env(USER, caller, trust, extra)
    assert caller == CALLER and trust == TRUST and extra == {"A": "1"}
    env["X"] = "1"
    assert "X" not in build_env(USER, caller, trust, extra)


# --- exit_code / launch ----------------------------------------------------------------------


@pytest.mark.parametrize(("rc", "code"), [(0, 0), (1, 1), (3, 3), (255, 255), (-2, 130),
                                          (-9, 137), (-15, 143), (-6, 134)])
def test_exit_code(rc, code):
    assert exit_code(rc) == code


def test_launch_without_a_command():
    with pytest.raises(PanopticonError) as info:
        agent.launch("panopticon-pnt-none", USER, [], {})
    assert info.value.status == ExitStatus.USAGE


def test_the_callers_environment_is_cut_to_what_the_jail_needs():
    env = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "TERM": "xterm",
           "SUDO_UID": "1000", "SUDO_GID": "1000", "SUDO_USER": "alice",
           "AWS_SECRET_ACCESS_KEY": "x", "GITHUB_TOKEN": "y", "SSH_AUTH_SOCK": "/tmp/s"}
    assert agent.caller_env(env) == {"PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C",
                                     "TERM": "xterm", "SUDO_UID": "1000", "SUDO_GID": "1000"}
