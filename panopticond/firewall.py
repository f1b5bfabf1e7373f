"""Apply, verify and remove `rules.RuleSet`s with python-iptables.

python-iptables binds libxtables to the address family that is loaded first, so one
process cannot program both IPv4 and IPv6 (the second fails with "can't find target
REDIRECT"), and it caches table handles per process. iptc is therefore never imported
here in the caller: each family runs in its own short-lived child, started with the
"spawn" method (a fork would inherit whatever the parent loaded) and running
`_iptc_worker.main`; the two families run in parallel.

    caller ──spawn──▶ child IPv4: setns(netns) → import iptc → per table: refresh,
           │                      policies, flush/rebuild, commit once → read back, diff
           └─spawn──▶ child IPv6: the same with ip6tables
                  ◀── ("ok", differences) or ("error", what failed)

Everything lands in the legacy xtables tables: Debian's `iptables` is the nft variant
and shows none of it; inspect with `iptables-legacy-save` / `ip6tables-legacy-save`.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import fcntl
import ipaddress
import logging
import multiprocessing
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from panopticond import _iptc_worker
from panopticond.errors import PanopticonError
from panopticond.rules import (
    BUILTIN_CHAINS,
    Rule,
    RuleSet,
    canonical_match_value,
    chain_prefix,
    format_rule,
)

log = logging.getLogger("panopticon")

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16
# Generous: the work takes well under a second, but a loaded machine may be slow.
CHILD_TIMEOUT = 30.0

_PROC_TABLES = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}


# ---------------------------------------------------------------------------- caller


def apply(rulesets: Sequence[RuleSet], netns: str | None = None) -> None:
    """Make the tables in `netns` (None: this process's namespace) match `rulesets`.

    Each table is committed once, then every chain is read back and compared with the
    plan. Raises PanopticonError if anything failed or differs; the message says what.
    A namespace's tables are either owned by one untagged rule set per family or shared
    by tagged ones: mixing them raises ValueError.
    """
    jobs = _jobs(rulesets)
    problems = _run("apply", jobs, netns)
    if problems:
        raise PanopticonError(
            f"iptables rules {_where(netns)} differ from the plan after applying them:\n  "
            + "\n  ".join(problems),
            hint=_hint(netns, jobs),
        )


def apply_each(plans: Sequence[tuple[Sequence[RuleSet], str | None]]) -> None:
    """`apply(rulesets, netns)` for every (rulesets, netns) pair, in order, each committed
    and read back as `apply` does, but with one child per family for all of them.

    Nearly all of a child's cost is `import iptc`: the jail's and the host's rules at
    start-up thus cost two children instead of four (on two cores, beside the proxy's
    start-up, that is most of the wait). The child enters each namespace in turn and
    returns to its own between them (None: the caller's namespace).
    """
    per_family: dict[int, list[tuple[str | None, tuple[RuleSet, ...]]]] = {}
    for rulesets, netns in plans:
        if netns is not None:
            _netns_path(netns)
        for family, sets in _jobs(rulesets).items():
            per_family.setdefault(family, []).append((netns, sets))
    problems = _run("apply-each", per_family, None)
    if problems:
        where = " and ".join(dict.fromkeys(_where(n) for _, n in plans))
        raise PanopticonError(
            f"iptables rules {where} differ from the plan after applying them:\n  "
            + "\n  ".join(problems),
            hint=_hint(next((n for _, n in plans if n), None), per_family),
        )


def verify(rulesets: Sequence[RuleSet], netns: str | None = None) -> list[str]:
    """The differences between `rulesets` and the tables in `netns`; empty means they match.

    Raises PanopticonError if the tables cannot be read at all.
    """
    return _run("verify", _jobs(rulesets), netns)


def remove_host_rules(tag: str, families: Iterable[int] = (4, 6), netns: str | None = None) -> None:
    """Remove the chains `PANO-<TAG>-*` and every rule that jumps to them. Idempotent.

    A table that was never instantiated in the namespace is left alone (opening it would
    create it), so removing from a host where nothing was applied touches nothing.
    """
    chain_prefix(tag)
    jobs = {}
    for family in families:
        if family not in (4, 6):
            raise ValueError(f"family is 4 or 6, not {family!r}")
        jobs[family] = tag
    problems = _run("remove", jobs, netns)
    if problems:
        raise PanopticonError(
            f"could not remove the iptables rules of instance tag {tag} {_where(netns)}:\n  "
            + "\n  ".join(problems),
            hint=_hint(netns, jobs),
        )


def _jobs(rulesets: Sequence[RuleSet]) -> dict[int, tuple[RuleSet, ...]]:
    jobs: dict[int, list[RuleSet]] = {}
    for rs in rulesets:
        if not isinstance(rs, RuleSet):
            raise TypeError(f"not a RuleSet: {rs!r}")
        jobs.setdefault(rs.family, []).append(rs)
    out = {}
    for family, sets in jobs.items():
        owned = [rs for rs in sets if rs.tag is None]
        for i, a in enumerate(owned):
            for b in owned[i + 1 :]:
                if set(a.tables) & set(b.tables):
                    raise ValueError(
                        f"two IPv{family} rule sets both own table(s) "
                        f"{sorted(set(a.tables) & set(b.tables))}"
                    )
        tagged = [rs for rs in sets if rs.tag is not None]
        for rs in owned:
            for other in tagged:
                if set(rs.tables) & set(other.tables):
                    # The owned set would flush the tagged chains, and call them unexpected.
                    raise ValueError(
                        f"an IPv{family} rule set owning {list(rs.tables)} and one tagged "
                        f"{other.tag} cannot be applied to the same namespace"
                    )
        out[family] = tuple(owned + tagged)
    return out


def _where(netns: str | None) -> str:
    return f"in network namespace {netns}" if netns else "in the host namespace"


def _hint(netns: str | None, families: Iterable[int]) -> str:
    tools = [("iptables-legacy-save" if f == 4 else "ip6tables-legacy-save") for f in families]
    if netns is None:
        prefix = ""
    elif "/" not in netns:
        prefix = f"ip netns exec {netns} "
    elif os.path.dirname(netns) == NETNS_DIR:
        prefix = f"ip netns exec {os.path.basename(netns)} "
    else:
        prefix = f"nsenter --net={netns} "
    shown = " and ".join(f"`{prefix}{tool}`" for tool in tools)
    return (
        f"inspect the tables with {shown} (python-iptables writes the legacy tables; "
        "Debian's plain `iptables` is the nft variant and does not show them)"
    )


def _netns_path(netns: str) -> str:
    if not netns or "\0" in netns:
        raise ValueError(f"bad network namespace {netns!r}")
    if "/" in netns:
        return netns
    if netns in (".", ".."):
        raise ValueError(f"bad network namespace name {netns!r}")
    return os.path.join(NETNS_DIR, netns)


# Children started ahead of their jobs (`prestart`), per family: (process, connection).
_warm: dict[int, list[tuple[Any, Any]]] = {}


def prestart(families: Iterable[int] = (4, 6)) -> None:
    """Start one child per family now; it runs every later `apply`/`apply_each`/`verify`/
    `remove_host_rules` of its family in this process, until `discard_prestarted()`.

    Nearly all of a child's cost is `import iptc`: started first, it overlaps whatever
    the caller does meanwhile, and is paid once for the start and the teardown of a jail.
    A warm child does nothing but import until it gets a job, and runs each job exactly
    as a fresh child would (tables re-opened in the job's namespace, home after): the
    order and the checks of the operations are unchanged. One that failed a job, died or
    stopped answering is never used again. Unused ones end with the caller (daemonic,
    and EOF on their pipe).
    """
    for family in families:
        if family not in (4, 6):
            raise ValueError(f"family is 4 or 6, not {family!r}")
        if _warm.get(family):
            continue
        _warm[family] = [spawn_warm(family)]


def spawn_warm(family: int) -> tuple[Any, Any]:
    """A new warm child for `family`: (process, connection). See `prestart`."""
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=_iptc_worker.serve, args=(theirs,),
                       name=f"panopticon-iptables-ipv{family}", daemon=True)
    proc.start()
    theirs.close()
    return proc, mine


class Borrowed:
    """A warm child of another process, lent to this one: the resident helper
    (helper.py) spawned it, and the jail process it forked uses it. multiprocessing only
    lets a process's own parent ask after it, so this asks /proc."""

    def __init__(self, pid: int):
        self.pid = pid
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False

    def join(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def borrow(lent: dict[int, tuple[int, Any]]) -> None:
    """In a process forked by the helper: use the warm children `lent` ({family:
    (pid, connection)}) as this process's prestarted ones. The helper takes them back
    only if this process ends with status 0 (every answer read): see helper.py."""
    _warm.clear()
    for family, (pid, conn) in lent.items():
        _warm[family] = [(Borrowed(pid), conn)]


def end_warm(proc: Any, conn: Any) -> None:
    """End a warm child `spawn_warm` made (EOF first, then a kill if it lingers)."""
    _end(proc, conn)


def all_borrowed_back() -> bool:
    """Whether this process again holds a warm child of each family, ready for a job:
    none was left mid-job or discarded after a failure (see `borrow`)."""
    return all(_warm.get(fam) for fam in (4, 6))


def forget_borrowed() -> None:
    """Drop this process's handles on borrowed children without ending them."""
    for pool in _warm.values():
        for proc, conn in pool:
            if isinstance(proc, Borrowed):
                conn.close()
    _warm.clear()


def discard_prestarted() -> None:
    """End the children `prestart` started."""
    while _warm:
        _, pool = _warm.popitem()
        for proc, conn in pool:
            _end(proc, conn)


def _end(proc: Any, conn: Any) -> None:
    conn.close()  # EOF: a warm child waiting for a job ends by itself
    proc.join(1)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _child_for(ctx: Any, op: str, family: int, netns: str | None,
               payload: Any) -> tuple[Any, Any, bool]:
    """(process, connection, warm) running `op` for `family`: a prestarted child, taken
    out of the pool until it has answered, or a new one."""
    pool = _warm.get(family)
    while pool:
        proc, conn = pool.pop()
        try:
            if not proc.is_alive():
                raise OSError("gone")
            conn.send((op, family, netns, payload))
            return proc, conn, True
        except OSError:
            _end(proc, conn)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_iptc_worker.main,
        args=(send, op, family, netns, payload),
        name=f"panopticon-iptables-ipv{family}",
        daemon=True,
    )
    proc.start()
    send.close()
    return proc, recv, False


def _run(op: str, jobs: dict[int, Any], netns: str | None) -> list[str]:
    """Run one child per family in parallel; their differences, or PanopticonError."""
    if netns is not None:
        _netns_path(netns)
    ctx = multiprocessing.get_context("spawn")
    started = []
    t0 = time.monotonic()
    try:
        for family, payload in sorted(jobs.items()):
            proc, recv, warm = _child_for(ctx, op, family, netns, payload)
            started.append((family, proc, recv, warm))
        log.debug("iptables %s: %s", op, ", ".join(
            f"IPv{f} {'warm' if w else 'new'} child" for f, _, _, w in started))

        deadline = time.monotonic() + CHILD_TIMEOUT
        problems: list[str] = []
        errors: list[str] = []
        reusable = []
        for i, (family, proc, recv, warm) in enumerate(list(started)):
            status, value = _answer(proc, recv, deadline)
            if warm and status is None:
                # A warm child that died before answering (killed while it waited, say):
                # every operation is idempotent, so a fresh child does it again.
                _end(proc, recv)
                _warm.pop(family, None)
                proc, recv, warm = _child_for(ctx, op, family, netns, jobs[family])
                started[i] = (family, proc, recv, warm)
                status, value = _answer(proc, recv, deadline)
            if status is None:
                status = "error"
            if status == "ok":
                problems += value
                if warm:
                    reusable.append(family)
            else:
                errors.append(f"IPv{family}: {value}")
        if errors:
            raise PanopticonError(
                f"iptables {op} failed {_where(netns)}:\n  " + "\n  ".join(errors),
                hint=_hint(netns, jobs),
            )
        log.debug("iptables %s: answered in %.0f ms", op, (time.monotonic() - t0) * 1000)
        for family, proc, recv, _ in started:
            if family in reusable:
                _warm.setdefault(family, []).append((proc, recv))
        started = [s for s in started if s[0] not in reusable]
        return problems
    finally:
        for _, proc, recv, _ in started:
            _end(proc, recv)


def _answer(proc: Any, recv: Any, deadline: float) -> tuple[str | None, Any]:
    """A child's (status, value); (None, why) if it died without answering."""
    try:
        if recv.poll(max(0.0, deadline - time.monotonic())):
            return recv.recv()
    except (EOFError, OSError):  # a socketpair (warm child) may say ECONNRESET instead
        proc.join(5)
        return None, f"the child process died (exit code {proc.exitcode})"
    return "error", f"no answer within {CHILD_TIMEOUT:.0f} s"


# ---------------------------------------------------------------------- child side


def _child(op: str, family: int, netns: str | None, payload: Any) -> tuple[str, Any]:
    """In the child: ("ok", differences) or ("error", what failed). Never raises."""
    try:
        if op == "apply-each":
            return _child_each(family, payload)
        if netns is not None:
            _enter_netns(netns)
        if op == "remove":
            present = _present_tables(family)
            if not present:
                return ("ok", [])
            return ("ok", _Tables(family, present).remove(chain_prefix(payload)))
        used = [t for t in BUILTIN_CHAINS if any(t in rs.tables for rs in payload)]
        if op == "verify":
            # Opening a missing table would create it: report it instead.
            used = [t for t in used if t in _present_tables(family)]
        tables = _Tables(family, used)
        if op == "apply":
            for rs in payload:
                tables.apply(rs)
        elif op != "verify":
            raise ValueError(f"unknown operation {op!r}")
        return ("ok", [d for rs in payload for d in tables.diff(rs)])
    except _Failure as e:
        return ("error", str(e))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        return ("error", f"{type(e).__name__}: {e}")


def _child_each(family: int, jobs: list[tuple[str | None, tuple[RuleSet, ...]]]) -> tuple[str, Any]:
    """"apply" in each namespace of `jobs` in turn, from and back to this one.

    python-iptables caches one table object per name, bound to the namespace where its
    handle was opened; `_Tables` refreshes (re-opens) every table it uses as it starts,
    after the `setns`, and declares the others unavailable, so no handle of the previous
    namespace is ever used or committed to. Handles are replaced, never closed (closing
    one in use crashes the process).
    """
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    problems: list[str] = []
    try:
        for netns, sets in jobs:
            _setns(home, "the caller's network namespace")
            if netns is not None:
                _enter_netns(netns)
            status, value = _child("apply", family, None, sets)
            if status != "ok":
                return ("error", f"{_where(netns)}: {value}")
            problems += [f"{_where(netns)}: {p}" for p in value]
        # Home again: a child left in a jail would keep its namespace alive.
        _setns(home, "the caller's network namespace")
    except _Failure as e:
        return ("error", str(e))
    finally:
        os.close(home)
    return ("ok", problems)


class _Failure(Exception):
    """A failure whose message already says where and what."""


def _enter_netns(netns: str) -> None:
    path = _netns_path(netns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _Failure(f"network namespace {netns} does not exist ({path})") from None
    try:
        _setns(fd, f"network namespace {netns}")
    finally:
        os.close(fd)


def _setns(fd: int, what: str) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise _Failure(f"cannot enter {what}: {os.strerror(err)}")


def _present_tables(family: int) -> list[str]:
    """The tables of `family` that exist in this namespace (reading creates nothing)."""
    try:
        with open(_PROC_TABLES[family]) as f:
            names = f.read().split()
    except FileNotFoundError:
        return []
    return [t for t in BUILTIN_CHAINS if t in names]


def _fast_find_library(original: Any) -> Any:
    """`ctypes.util.find_library`, first looking for lib<name>.so.<N> in the system's
    library directories: python-iptables asks for four libraries as it is imported, and
    ctypes answers each by running ldconfig and gcc (~80 ms of every iptables child's
    start). Anything not found there is asked of ctypes as before."""
    import glob
    import sysconfig

    arch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{arch}", f"/lib/{arch}"] if arch else []
    dirs += ["/usr/lib64", "/lib64", "/usr/lib", "/lib"]

    def find_library(name: str) -> str | None:
        if name == "xtwrapper":
            return None  # python-iptables' own helper: it finds it in its package next
        for d in dirs:
            found = sorted(glob.glob(os.path.join(d, f"lib{glob.escape(name)}.so.[0-9]*")),
                           key=len)
            if found:
                return os.path.basename(found[0])  # the soname, as ctypes gives it
        return original(name)

    return find_library


def _import_iptc() -> Any:
    # python-iptables imports distutils only to locate its own helper library; on Python
    # 3.11 that drags in setuptools, half of the child's cost. Its fallback (sysconfig)
    # finds the same directory. If a future version needs distutils for real, import
    # it normally.
    import ctypes.util

    original = ctypes.util.find_library
    ctypes.util.find_library = _fast_find_library(original)
    try:
        return _import_iptc_itself()
    finally:
        ctypes.util.find_library = original


def _import_iptc_itself() -> Any:
    if "distutils" not in sys.modules:
        sys.modules["distutils"] = None  # type: ignore[assignment]
        try:
            import iptc

            return _without_round_trip(iptc)
        except ImportError:
            for name in [m for m in sys.modules if m == "iptc" or m.startswith("iptc.")]:
                del sys.modules[name]
        finally:
            if sys.modules.get("distutils", 0) is None:
                del sys.modules["distutils"]
    import iptc

    return _without_round_trip(iptc)


def _without_round_trip(iptc: Any) -> Any:
    """python-iptables' `final_check` of every match and target first prints it with the
    extension's `save`, splits that with shlex, resets it and parses every option again
    (`_update_parameters`), then runs the extension's own final check: half of the time
    of adding a rule. The extension's check alone is kept. What this could change is
    caught: every table is read back and compared with the plan after its commit, and a
    difference fails the start (tests/integration/test_firewall.py)."""
    cls = iptc.ip4tc.IPTCModule
    if not getattr(cls, "_panopticon_checked", False):
        def final_check(self: Any) -> None:
            if self._module:
                self._final_check()

        cls.final_check = final_check
        cls._panopticon_checked = True
    return iptc


def _net(value: str | None) -> str | None:
    if value is None:
        return None
    neg = "!" if value.startswith("!") else ""
    net = ipaddress.ip_network(value.lstrip("!"), strict=False)
    if net.prefixlen == 0 and not neg:
        return None
    return neg + str(net)


def _params(module: Any) -> tuple[tuple[str, str], ...]:
    out = []
    for key, values in _all_parameters(module).items():
        neg = values[:1] == ["!"]
        value = ("!" if neg else "") + " ".join(values[1:] if neg else values)
        out.append((key, value))
    return tuple(out)


def _all_parameters(module: Any) -> dict[str, list[str]]:
    """python-iptables' `get_all_parameters`, but shlex (slow, pure Python) only where
    the saved text has quoting; otherwise a plain split gives the same words."""
    buf = module._get_saved_buf(module.rule.get_ip())
    if buf is None:
        return {}
    if not isinstance(buf, str):
        buf = buf.decode()
    words = shlex.split(buf) if any(c in buf for c in "\"'\\") else buf.split()
    params: dict[str, list[str]] = {}
    key, inv = None, False
    for x in words:
        if x == "!":
            inv = True
        elif x.startswith("--"):
            key = x[2:]
            params[key] = ["!"] if inv else []
            inv = False
        elif key is not None:
            params[key].append(x)
    return params


class _Tables:
    """python-iptables for one family and the tables `names`, in the current namespace.

    python-iptables keeps one cached handle per table and consults every table it
    believes available whenever it builds or decodes a target (to tell a chain from an
    extension). So: the tables we do not use are declared unavailable, else merely
    decoding a rule would create mangle, raw and security; and handles are never closed
    while in use, else that lookup dereferences a freed handle and the process crashes.
    """

    def __init__(self, family: int, names: Sequence[str]):
        iptc = _import_iptc()
        self.family = family
        self.iptc = iptc
        self._table = iptc.Table if family == 4 else iptc.Table6
        self._rule = iptc.Rule if family == 4 else iptc.Rule6
        self.label = f"IPv{family}"
        self.names = tuple(names)
        self._table.existing_table_names.update({n: n in names for n in self._table.ALL})
        for name in self.names:
            self.table(name)

    def table(self, name: str) -> Any:
        """A fresh handle on table `name`: changes are kept until `commit()`."""
        if name not in self.names:
            raise _Failure(f"{self.label}: table {name} was not opened")
        try:
            t = self._table(name, autocommit=False)
            t.refresh()
        except self.iptc.IPTCError as e:
            raise _Failure(f"{self.label} {name}: {e}") from None
        return t

    def build(self, rule: Rule) -> Any:
        r = self._rule()
        if rule.protocol:
            r.protocol = rule.protocol
        if rule.src:
            r.src = rule.src
        if rule.dst:
            r.dst = rule.dst
        if rule.in_iface:
            r.in_interface = rule.in_iface
        if rule.out_iface:
            r.out_interface = rule.out_iface
        self._fix_iface_masks(r)
        for name, params in rule.matches:
            m = r.create_match(name)
            for key, value in params:
                m.set_parameter(key, value)
        t = r.create_target(rule.target)
        for key, value in rule.target_args:
            t.set_parameter(key, value)
        return r

    def _ip(self, r: Any) -> Any:
        return r.entry.ip if self.family == 4 else r.entry.ipv6

    def _fix_iface_masks(self, r: Any) -> None:
        # python-iptables (up to 1.2.0 at least, ldx/python-iptables#244) fills an IPv6
        # rule's interface masks with 0x01 bytes, so the kernel compares only the lowest
        # bit of each character: `-o lo` then also matches e.g. "ve0", and the agent's
        # traffic on such a veth is accepted as loopback. ip6tables-save cannot show it.
        ip = self._ip(r)
        for value, field in ((r.in_interface, "iniface_mask"), (r.out_interface, "outiface_mask")):
            if value:
                setattr(ip, field, _iface_mask(value))

    def _iface(self, r: Any, value: str | None, field: str) -> str | None:
        """The interface as planned, or marked if its mask is not the exact one."""
        if value is None:
            return None
        ip = self._ip(r)
        offset = getattr(type(ip), field).offset
        mask = ctypes.string_at(ctypes.addressof(ip) + offset, IFNAMSIZ)
        if mask != _iface_mask(value):
            return f"{value}[mask:{mask.hex()}]"
        return value

    def render(self, chain: str, r: Any) -> str:
        """A kernel rule in the form `Rule.describe()` gives the plan."""
        proto = r.protocol
        if proto in ("ip", "all", "0", "!ip"):
            proto = None
        matches = []
        for m in r.matches:
            params = tuple((k, canonical_match_value(m.name, k, v)) for k, v in _params(m))
            matches.append((m.name, params))
        target = r.target.name if r.target is not None else "?"
        if r.target is not None and r.target.goto:
            target += " (goto)"
        return format_rule(
            chain,
            protocol=proto,
            src=_net(r.src),
            dst=_net(r.dst),
            in_iface=self._iface(r, r.in_interface, "iniface_mask"),
            out_iface=self._iface(r, r.out_interface, "outiface_mask"),
            matches=matches,
            target=target,
            target_args=_params(r.target) if r.target is not None else (),
        )

    def _commit(self, t: Any, what: str) -> None:
        try:
            t.commit()
        except self.iptc.IPTCError as e:
            raise _Failure(f"{self.label} {t.name}: commit of {what} failed: {e}") from None
        t.refresh()

    def _add(self, t: Any, rule: Rule, position: int | None = None) -> None:
        try:
            chain = self.iptc.Chain(t, rule.chain)
            if position is None:
                chain.append_rule(self.build(rule))
            else:
                chain.insert_rule(self.build(rule), position)
        except Exception as e:  # noqa: BLE001 - python-iptables raises several types
            raise _Failure(f"{self.label} {t.name}: cannot add `{rule.describe()}`: {e}") from None

    def apply(self, rs: RuleSet) -> None:
        for table in rs.tables:
            with _xtables_lock():
                t = self.table(table)
                if rs.tag is None:
                    self._rebuild(t, rs)
                else:
                    self._replace_tagged(t, rs)
                self._commit(t, "the tagged chains" if rs.tag else "the whole table")

    def _rebuild(self, t: Any, rs: RuleSet) -> None:
        names = [c.name for c in t.chains]
        builtin = [n for n in names if t.builtin_chain(n)]
        # Policies first. The single commit swaps the whole table at once, so no packet
        # ever meets a half-built table, and a failure below commits nothing at all.
        for name in builtin:
            t.set_policy(name, rs.policies.get((t.name, name), "ACCEPT"))
        for name in names:
            t.flush_entries(name)
        for name in names:
            if name not in builtin:
                t.delete_chain(name)
        for table, name in rs.chains:
            if table == t.name:
                t.create_chain(name)
        for rule in rs.rules:
            if rule.table == t.name:
                self._add(t, rule)

    def _replace_tagged(self, t: Any, rs: RuleSet) -> None:
        self._remove_prefix(t, chain_prefix(rs.tag or ""))
        for table, name in rs.chains:
            if table == t.name:
                t.create_chain(name)
        positions: dict[str, int] = {}
        for rule in rs.rules:
            if rule.table != t.name:
                continue
            if rule.chain in BUILTIN_CHAINS[t.name]:
                # Inserted at the top: a broader ACCEPT of the host's must not come first.
                self._add(t, rule, positions.get(rule.chain, 0))
                positions[rule.chain] = positions.get(rule.chain, 0) + 1
            else:
                self._add(t, rule)

    def _remove_prefix(self, t: Any, prefix: str) -> None:
        ours = [c.name for c in t.chains if c.name.startswith(prefix)]
        for chain in t.chains:
            if chain.name in ours:
                continue
            for r in reversed(chain.rules):
                if r.target is not None and r.target.name.startswith(prefix):
                    chain.delete_rule(r)
        for name in ours:
            t.flush_entries(name)
        for name in ours:
            t.delete_chain(name)

    def remove(self, prefix: str) -> list[str]:
        """Remove `prefix` chains and jumps; what is left afterwards (empty when done)."""
        for table in self.names:
            with _xtables_lock():
                t = self.table(table)
                self._remove_prefix(t, prefix)
                self._commit(t, f"the removal of {prefix}*")
        left = []
        for table in self.names:
            t = self.table(table)
            for chain in t.chains:
                if chain.name.startswith(prefix):
                    left.append(f"{self.label} {table}: chain {chain.name} still exists")
                for r in chain.rules:
                    if r.target is not None and r.target.name.startswith(prefix):
                        left.append(f"{self.label} {table}: {self.render(chain.name, r)} remains")
        return left

    def diff(self, rs: RuleSet) -> list[str]:
        """Every way the tables differ from `rs`, one line each."""
        out: list[str] = []
        for table in rs.tables:
            where = f"{self.label} {table}"
            if table not in self.names:
                out.append(f"{where}: the table does not exist")
                continue
            t = self.table(table)
            chains = {c.name: c for c in t.chains}
            planned = [c for tb, c in rs.chains if tb == table]
            out += [f"{where}: chain {n} is missing" for n in planned if n not in chains]
            for name, chain in chains.items():
                builtin = t.builtin_chain(name)
                ours = rs.tag is None or rs.owns_chain(name)
                if not builtin and not ours:
                    continue
                if not builtin and name not in planned:
                    out.append(f"{where}: unexpected chain {name}")
                    continue
                if builtin and rs.tag is None:
                    policy = t.get_policy(name)[0].name
                    want = rs.policies.get((table, name), "ACCEPT")
                    if policy != want:
                        out.append(f"{where} {name}: policy is {policy}, planned {want}")
                rules = chain.rules
                if rs.tag is not None and builtin:
                    # Only our jumps: the host's own rules are not ours to judge.
                    rules = [
                        r for r in rules if r.target is not None and rs.owns_chain(r.target.name)
                    ]
                expected = [r.describe() for r in rs.chain_rules(table, name)]
                out += _compare(f"{where} {name}", expected, [self.render(name, r) for r in rules])
        return out


XTABLES_LOCK_WAIT = 30.0


@contextlib.contextmanager
def _xtables_lock():
    """iptables' own lock (`iptables -w`), around each table's read, change and commit.

    The kernel takes a table whole (IPT_SO_SET_REPLACE) and refuses, with EAGAIN, one
    built from a copy that changed meanwhile: two jails starting at once (or Docker
    beside us) must take turns on the host's tables, as the iptables commands do on the
    same lock file."""
    path = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + XTABLES_LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _Failure(f"another program has held {path} for "
                                   f"{XTABLES_LOCK_WAIT:.0f} s") from None
                time.sleep(0.002)
        yield
    finally:
        os.close(fd)  # releases the lock


def _iface_mask(value: str) -> bytes:
    """The kernel's mask for an interface name: the name and its NUL, or the prefix for "x+"."""
    name = value.lstrip("!")
    n = len(name) - 1 if name.endswith("+") else len(name) + 1
    return b"\xff" * n + b"\x00" * (IFNAMSIZ - n)


def _compare(where: str, expected: list[str], actual: list[str]) -> list[str]:
    out = []
    matcher = difflib.SequenceMatcher(a=expected, b=actual, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        out += [f"{where}: missing planned rule {i + 1}: {expected[i]}" for i in range(i1, i2)]
        out += [f"{where}: unexpected rule {j + 1}: {actual[j]}" for j in range(j1, j2)]
    return out
