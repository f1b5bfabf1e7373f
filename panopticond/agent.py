"""Launching the agent: who it runs as, what it inherits, and its exit status.

The agent runs inside the instance namespace under its own uid and gid, with no
capabilities (bounding and ambient sets emptied, nothing effective after the uid
change) and `no_new_privs`. Its environment is built from scratch: a few variables of
the caller that describe the terminal and locale, its own identity, the trust
variables of the instance CA, and what the operator passes explicitly. Nothing of the
daemon's (SUDO_*, NOTIFY_SOCKET, CREDENTIALS_DIRECTORY, ...) leaks through.

stdin, stdout, stderr and the controlling terminal are the caller's: the agent stays in
the caller's process group, so Ctrl-C reaches it directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import os
import pwd
import signal
import subprocess
from collections.abc import Mapping

from . import privs
from .errors import ExitStatus, PanopticonError

# Caller variables that describe the terminal and the locale; never the daemon's own.
PASS_ENV = ("TERM", "COLORTERM", "LANG", "LANGUAGE", "TZ", "NO_COLOR", "PATH")
PASS_ENV_PREFIX = ("LC_",)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

# Supplementary groups that would hand the agent a way around the jail (a socket to a
# root daemon on the host, or root itself): never given, even if the user has them.
DANGEROUS_GROUPS = frozenset(
    {"root", "sudo", "wheel", "admin", "adm", "docker", "lxd", "incus", "libvirt", "disk",
     "kvm", "shadow", "systemd-journal", "podman"}
)


@dataclasses.dataclass(frozen=True)
class AgentUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str


# What `resolve_user` and `build_env` read of the caller's environment.
CALLER_ENV = ("SUDO_UID", "SUDO_GID")


def caller_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the caller's environment that the jail needs: what the agent may
    inherit (`build_env`) and who called sudo (`resolve_user`). The rest (the caller's
    tokens, say) never reaches the resident helper, whose proxy is forked with the
    memory of the process that built the jail."""
    return {k: v for k, v in environ.items()
            if k in PASS_ENV or k.startswith(PASS_ENV_PREFIX) or k in CALLER_ENV}


def resolve_user(
    explicit: str | None,
    environ: Mapping[str, str],
    *,
    proxy_uid: int,
    proxy_gid: int,
) -> AgentUser:
    """`--user`/config first, else the user who called sudo; root is refused."""
    if explicit:
        try:
            pw = pwd.getpwuid(int(explicit)) if explicit.isdigit() else pwd.getpwnam(explicit)
        except KeyError:
            raise PanopticonError(
                f"no such user: {explicit!r}",
                hint="name an existing user with --user or `user =` in the config",
                status=ExitStatus.NOPERM,
            ) from None
        gid = pw.pw_gid
    elif environ.get("SUDO_UID", "").isdigit():
        uid = int(environ["SUDO_UID"])
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            raise PanopticonError(f"SUDO_UID {uid} has no passwd entry",
                                  hint="pass --user", status=ExitStatus.NOPERM) from None
        gid = int(environ["SUDO_GID"]) if environ.get("SUDO_GID", "").isdigit() else pw.pw_gid
    else:
        raise PanopticonError(
            "refusing to run the agent as root",
            hint="run through sudo as your own user, or pass --user USER "
            "(an agent running as root could rewrite the jail)",
            status=ExitStatus.NOPERM,
        )
    if pw.pw_uid == 0 or gid == 0:
        raise PanopticonError(
            "refusing to run the agent as root (uid or gid 0)",
            hint="pass --user with an unprivileged user",
            status=ExitStatus.NOPERM,
        )
    try:
        primary = grp.getgrgid(gid).gr_name
    except KeyError:
        primary = ""
    if primary in DANGEROUS_GROUPS:
        raise PanopticonError(
            f"refusing to run the agent with primary group {primary!r}",
            hint="that group leads around the jail; pass --user, or call sudo from a shell "
            "whose primary group is your own",
            status=ExitStatus.NOPERM,
        )
    if pw.pw_uid == proxy_uid or gid == proxy_gid:
        raise PanopticonError(
            f"the agent user {pw.pw_name} is the proxy user (or in its group)",
            hint="the proxy user is exempt from the redirect; run the agent as another user",
            status=ExitStatus.NOPERM,
        )
    groups = []
    for g in os.getgrouplist(pw.pw_name, gid):
        try:
            gname = grp.getgrgid(g).gr_name
        except KeyError:
            gname = ""
        if g in (0, proxy_gid) or gname in DANGEROUS_GROUPS:
            continue
        groups.append(g)
    return AgentUser(pw.pw_name, pw.pw_uid, gid, tuple(groups), pw.pw_dir, pw.pw_shell)


def build_env(
    user: AgentUser,
    caller_env: Mapping[str, str],
    trust_env: Mapping[str, str],
    extra: Mapping[str, str] = {},
) -> dict[str, str]:
    env = {
        k: v for k, v in caller_env.items()
        if k in PASS_ENV or k.startswith(PASS_ENV_PREFIX)
    }
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(HOME=user.home, USER=user.name, LOGNAME=user.name, SHELL=user.shell or "/bin/sh")
    env.update(trust_env)
    env.update(extra)
    return env


def launch(
    netns_name: str,
    user: AgentUser,
    argv: list[str],
    env: Mapping[str, str],
    cwd: str | None = None,
) -> subprocess.Popen:
    if not argv:
        raise PanopticonError("no command to run", hint="panopticon run -- CMD ARGS...",
                              status=ExitStatus.USAGE)
    workdir = cwd or os.getcwd()

    def preexec() -> None:  # pragma: no cover - runs in the child
        privs.enter_and_drop(netns_name, user.uid, user.gid, list(user.groups),
                            confine=True)
        try:
            os.chdir(workdir)
        except OSError:
            os.chdir(user.home if os.path.isdir(user.home) else "/")

    try:
        return subprocess.Popen(argv, env=dict(env), preexec_fn=preexec, cwd="/",
                                close_fds=True)
    except FileNotFoundError:
        raise PanopticonError(f"command not found: {argv[0]}",
                              hint="give the full path, or check PATH",
                              status=ExitStatus.USAGE) from None
    except PermissionError:
        raise PanopticonError(f"permission denied running {argv[0]} as {user.name}",
                              status=ExitStatus.NOPERM) from None


def run(netns_name: str, user: AgentUser, argv: list[str], env: Mapping[str, str]) -> int:
    """Launch the agent and wait for it; its exit status (`exit_code`)."""
    proc = launch(netns_name, user, argv, env)

    # Ctrl-C reaches the agent from the terminal (same process group): let it decide.
    # SIGTERM/SIGHUP to us are passed on; the caller tears down once it has exited.
    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, h) for s, h in (
        (signal.SIGINT, signal.SIG_IGN), (signal.SIGTERM, forward), (signal.SIGHUP, forward))}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return exit_code(rc)


def exit_code(returncode: int) -> int:
    """A shell's convention: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode
