"""A real systemd for the system tier: a minimal Debian booted with systemd-nspawn.

The recipe of shared/notes/systemd.md, with two caches under /var/cache/panopticon-test/,
each keyed by a hash of its inputs so that a change of recipe builds anew:

    rootfs-HASH.tar.zst   mmdebstrap of a minimal Debian with systemd (the slow part)
    wheels-HASH/          the runtime dependencies as wheels, built on this host (so the
                          container needs neither a compiler nor the package registry)

Per run, into a fresh directory that is removed afterwards: unpack the root filesystem,
run the project's own scripts/install in it (not booted, no network: the wheels come
from the cache), then boot it with a test unit that runs `inside.py` and powers off
with its status.

`Unavailable` is raised when this machine cannot do it (no root, the tools cannot be
installed, the mirror or the registry cannot be reached): the test then skips, saying
why. Anything else is a failure.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/panopticon-test")
SUITE = "bookworm"
INCLUDE = ("systemd", "systemd-sysv", "dbus", "iproute2", "iptables", "python3", "python3-venv",
           "procps", "ca-certificates", "curl")
TOOLS = {"mmdebstrap": "mmdebstrap", "systemd-nspawn": "systemd-container", "zstd": "zstd"}
RECIPE_VERSION = 1
NSPAWN = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit"]


class Unavailable(Exception):
    """This machine cannot run the system tier; the message says why."""


def _run(argv: list[str], timeout: float, what: str, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed ({p.returncode}): {(p.stderr or p.stdout)[-2000:]}")
    return p


def ensure_tools() -> None:
    if os.geteuid() != 0:
        raise Unavailable("needs root")
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "-o", "DPkg::Lock::Timeout=600", *missing],
                       capture_output=True, text=True, env=env, timeout=900)
    still = [t for t in TOOLS if shutil.which(t) is None]
    if still:
        raise Unavailable(f"{', '.join(still)} not installed and `apt-get install "
                          f"{' '.join(missing)}` failed: {p.stderr.strip()[-300:]}")


def mirror() -> str:
    """The Debian mirror apt on this machine already uses (never a name of our own)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in Path(path).read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
            if SUITE in fields.get("Suites", "").split() and "main" in fields.get(
                    "Components", "").split():
                return fields["URIs"].split()[0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if os.path.exists(path):
            for line in Path(path).read_text().splitlines():
                m = re.match(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s+.*\bmain\b", line)
                if m:
                    return m.group(1)
    raise Unavailable(f"no Debian {SUITE} mirror configured for apt on this machine")


def _key(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def rootfs(timings: dict[str, float]) -> Path:
    url = mirror()
    recipe = {"suite": SUITE, "variant": "minbase", "include": INCLUDE, "mirror": url,
              "v": RECIPE_VERSION}
    path = CACHE / f"rootfs-{_key(recipe)}.tar.zst"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    t = time.monotonic()
    p = subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                        "--mode=root", "--format=tar", SUITE, str(tmp), url],
                       capture_output=True, text=True, timeout=1200)
    if p.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise Unavailable(f"mmdebstrap could not build the root filesystem from {url} "
                          f"(the mirror may be unreachable): {p.stderr.strip()[-400:]}")
    # mmdebstrap writes a plain tar for a .tmp name; compress it ourselves.
    _run(["zstd", "-q", "-T0", "--rm", "-o", str(path) + ".part", str(tmp)], 600, "zstd")
    os.replace(str(path) + ".part", path)
    timings["rootfs_build"] = time.monotonic() - t
    return path


def wheels(timings: dict[str, float]) -> Path:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = project["project"]["dependencies"] + project["build-system"]["requires"] + ["wheel"]
    key = _key({"deps": deps, "python": list(sys.version_info[:2]), "v": RECIPE_VERSION})
    path = CACHE / f"wheels-{key}"
    if path.is_dir():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="wheels-", dir=CACHE))
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                        "-w", str(tmp), *deps], capture_output=True, text=True, timeout=1200,
                       cwd=tmp)
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Unavailable(f"pip could not fetch or build the dependencies (the registry may be "
                          f"unreachable): {p.stderr.strip()[-400:]}")
    tmp.chmod(0o755)
    os.replace(tmp, path)
    timings["wheels_build"] = time.monotonic() - t
    return path


CI_UNIT = """[Unit]
Description=panopticon system tier
After=basic.target
SuccessAction=exit
FailureAction=exit

[Service]
Type=oneshot
Environment=PYTHONDONTWRITEBYTECODE=1
ExecStart=/opt/panopticon/venv/bin/python /ci-src/tests/systemd/inside.py /ci-out
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=400
"""


def run(outdir: Path, timings: dict[str, float]) -> subprocess.CompletedProcess:
    """Build (or reuse), install, boot, test. Returns the booted container's process result;
    its exit status is inside.py's (255: the test unit timed out)."""
    ensure_tools()
    t0 = time.monotonic()
    tarball = rootfs(timings)
    wheel_dir = wheels(timings)
    work = Path(tempfile.mkdtemp(prefix="pnt-nspawn-", dir="/var/tmp"))
    try:
        root = work / "root"
        root.mkdir()
        t = time.monotonic()
        _run(["tar", "-C", str(root), "--use-compress-program=zstd -d", "-xf", str(tarball)],
             600, "unpacking the root filesystem")
        timings["unpack"] = time.monotonic() - t
        t = time.monotonic()
        _run([*NSPAWN, "--private-network", "-D", str(root),
              f"--bind-ro={REPO}:/ci-src", f"--bind-ro={wheel_dir}:/ci-wheels",
              "--setenv=PIP_NO_INDEX=1", "--setenv=PIP_FIND_LINKS=/ci-wheels",
              "--setenv=PYTHONDONTWRITEBYTECODE=1", "/ci-src/scripts/install"],
             900, "scripts/install in the container")
        timings["install"] = time.monotonic() - t
        unit = work / "ci-test.service"
        unit.write_text(CI_UNIT)
        outdir.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        p = subprocess.run(
            ["timeout", "-k", "30", "600", *NSPAWN, "--boot", "--private-network",
             "--console=read-only", "-D", str(root), f"--bind-ro={REPO}:/ci-src",
             f"--bind={outdir}:/ci-out", f"--bind-ro={unit}:/etc/systemd/system/ci-test.service",
             "--", "systemd.wants=ci-test.service"],
            capture_output=True, text=True, timeout=700)
        timings["boot_and_test"] = time.monotonic() - t
        return p
    finally:
        shutil.rmtree(work, ignore_errors=True)
        timings["total"] = time.monotonic() - t0
