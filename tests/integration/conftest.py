"""Fixtures shared by the integration tests: root, real namespaces, the lab.

Every test in this directory runs as root against the lab (`panopticond.lab`), a
simulated internet in network namespaces; without root they are all skipped. One lab
serves the whole session: tests tell their own traffic apart with `mark` and
`lab.events(since=mark)`, and any test that needs a different topology builds its own
`Lab.create()` in a `with` block.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from panopticond.lab import Lab, cleanup_stale

_LAB_TIMINGS = pytest.StashKey[dict]()


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root: they build real network namespaces")


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The session's lab; what a killed earlier run left is removed first."""
    cleanup_stale()
    before = _jails()
    the_lab = Lab.create()
    request.config.stash[_LAB_TIMINGS] = the_lab.timings
    try:
        yield the_lab
    finally:
        # The safety net: a jail that a failed test left (a run killed on purpose
        # leaves its jail) goes with the lab, its host rules included. Without --force:
        # `cleanup` leaves alone a jail whose owner still runs (not one of ours).
        _remove_jails(the_lab, _jails() - before)
        the_lab.close()


def _jails() -> set[str]:
    try:
        return set(os.listdir("/run/panopticon"))
    except FileNotFoundError:
        return set()


def _remove_jails(the_lab: Lab, names: set[str]) -> None:
    import subprocess

    import jailrun

    for name in sorted(names):
        if os.path.isdir(f"/run/panopticon/{name}"):
            subprocess.run(the_lab.in_host([*jailrun.PANOPTICON_ARGV, "cleanup", name]),
                           capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def resident_helper(lab: Lab):
    """One resident helper (helper.py) for the session, in the lab's simulated host."""
    import jailrun

    with jailrun.ResidentHelper(lab) as h:
        yield h


@pytest.fixture
def mark(lab: Lab) -> int:
    """The lab's event log position when the test starts: `lab.events(since=mark)`."""
    return lab.mark()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    timings = config.stash.get(_LAB_TIMINGS, None)
    if timings:
        terminalreporter.write_line(
            "lab: created in {:.2f}s, closed in {:.2f}s".format(
                timings.get("create", float("nan")), timings.get("close", float("nan"))
            )
        )
