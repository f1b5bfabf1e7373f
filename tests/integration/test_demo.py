"""`panopticon demo` end to end: exit 0, every row OK in both families, nothing left behind.

One demo run (a few seconds) serves every assertion. Other test sessions may run labs and
jails on this machine at the same time, so "nothing left" is checked for the names this
demo printed, and for any other new name only if its owner process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from panopticond.plan import Names

pytestmark = pytest.mark.root

PROBES = ("HTTPS www.allowed.example (allowed)", "HTTPS denied.example at", "DNS lookup",
          "TCP ")


def _panopticon() -> list[str]:
    # The installed command: the demo's jail runs the installed package in any case.
    exe = shutil.which("panopticon")
    return [exe] if exe else [sys.executable, "-m", "panopticond.cli"]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True,
                         text=True).stdout
    return {line.split()[0] for line in out.splitlines()
            if line.split() and line.startswith(("pnl-", "panopticon-"))}


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], check=True, capture_output=True,
                         text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
    return {n for n in names if n.startswith(("pnh", "pnl"))}


def _alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _owner_alive(ns: str) -> bool:
    """Whether a namespace belongs to a lab or jail whose owner still runs."""
    if m := re.fullmatch(r"pnl-([0-9a-z]+)-(?:host|net)", ns):
        return _alive(Path("/run/pnl-lab") / m.group(1) / "owner")
    if ns.startswith("panopticon-"):
        return _alive(Path(Names.of(ns[len("panopticon-"):]).run_dir) / "owner.pid")
    return False


def _temp_dirs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("panopticon-demo-*") if p.is_dir()}


def test_demo_all_rows_ok_and_nothing_left() -> None:
    ns_before, links_before, tmp_before = _namespaces(), _links(), _temp_dirs()
    proc = subprocess.run([*_panopticon(), "demo", "-v"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300, cwd="/")
    kept = re.search(r"^Request log \(\d+ lines, kept\): (\S+)$", proc.stdout, re.M)
    try:
        shown = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert proc.returncode == 0, shown

        rows = [line.split() for line in proc.stdout.splitlines()
                if line.startswith(("IPv4 ", "IPv6 "))]
        assert len(rows) == 8, shown
        assert all(row[-1] == "OK" for row in rows), shown
        for family in ("IPv4", "IPv6"):
            mine = [" ".join(r) for r in rows if r[0] == family]
            for probe in PROBES:
                assert sum(probe in r for r in mine) == 1, (family, probe, shown)
        assert "All 8 checks OK" in proc.stdout, shown
        assert re.search(r"^The demo took \d+\.\d s", proc.stdout, re.M), shown

        # The request log it kept saw both the allowed and the blocked traffic.
        assert kept, shown
        log = Path(kept.group(1)).read_text()
        assert '"decision": "allow"' in log and '"decision": "deny"' in log, log

        # Its own lab and jail, by the names it printed, are gone.
        lab = re.search(r"namespaces (pnl-(\w+)-host), (pnl-\w+-net)", proc.stderr)
        jail = re.search(r"jail instance (run-\d+) \(namespace (panopticon-run-\d+)\)",
                         proc.stderr)
        assert lab and jail, shown
        names = Names.of(jail.group(1))
        ns_after, links_after = _namespaces(), _links()
        assert not {lab.group(1), lab.group(3), jail.group(2)} & ns_after
        tag = lab.group(2)
        assert not {f"pnl{tag}h", f"pnl{tag}i", names.veth_host, names.veth_jail} & links_after
        assert not Path(names.run_dir).exists()
        assert not Path(names.state_dir).exists()  # an ephemeral CA, nothing kept
        assert not Path(f"/run/pnl-lab/{tag}").exists()

        # Nor anything else new whose owner is gone.
        assert not {ns for ns in ns_after - ns_before if not _owner_alive(ns)}
        assert not links_after - links_before
        assert not _temp_dirs() - tmp_before
    finally:
        if kept:
            Path(kept.group(1)).unlink(missing_ok=True)
