"""sandbox.py: the seccomp program as data, and its effect in a real child process."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from panopticond import sandbox


def test_program_is_whole_instructions_and_checks_the_arch():
    prog = sandbox.filter_program("x86_64")
    assert len(prog) % 8 == 0 and len(prog) // 8 == 14
    # The first instruction loads the arch; a foreign ABI is refused, never allowed.
    assert prog[:8] == sandbox._stmt(sandbox.BPF_LD | sandbox.BPF_W | sandbox.BPF_ABS, 4)
    assert sandbox.filter_program("aarch64") != prog


def test_unknown_machine_refuses_rather_than_running_unfiltered():
    with pytest.raises(OSError, match="no seccomp filter"):
        sandbox.filter_program("mips")


def _try_userns(filtered: bool) -> subprocess.CompletedProcess:
    def pre():
        if filtered:
            ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # no_new_privs
            sandbox.deny_user_namespaces()

    return subprocess.run(["unshare", "--user", "--map-root-user", "true"], preexec_fn=pre,
                          capture_output=True, text=True, timeout=20)


@pytest.mark.skipif(not shutil.which("unshare"), reason="no unshare(1)")
def test_filter_denies_user_namespaces_and_only_that():
    control = _try_userns(filtered=False)
    if control.returncode != 0:
        pytest.skip(f"user namespaces are unavailable here anyway: {control.stderr.strip()}")
    denied = _try_userns(filtered=True)
    assert denied.returncode != 0 and "Operation not permitted" in denied.stderr
    # Ordinary process creation (clone without CLONE_NEWUSER, clone3 -> ENOSYS fallback)
    # and threads keep working under the filter.
    def pre():
        ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
        sandbox.deny_user_namespaces()

    code = ("import threading, subprocess; t = threading.Thread(target=print); t.start(); "
            "t.join(); print(subprocess.run(['true']).returncode)")
    ok = subprocess.run(["/usr/bin/python3", "-c", code], preexec_fn=pre, capture_output=True,
                        text=True, timeout=20)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("0"), ok


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root")
def test_hidden_directories_are_empty_in_the_child_only(tmp_path):
    probe = "/run/systemd"
    if not os.path.isdir(probe):
        pytest.skip("no /run/systemd here")
    code = "import os; print(sorted(os.listdir('/run/systemd')))"
    out = subprocess.run(["/usr/bin/python3", "-c", code], preexec_fn=sandbox.hide_host_sockets,
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['resolve']"  # only the resolver file we put back
    # The host's own view is untouched.
    assert sorted(os.listdir(probe)) != ["resolve"]
