"""One mitmproxy chain entry for a run of panopticon's addons (issue 8).

mitmproxy's `AddonManager.trigger_event` runs every event through every entry of its
chain: per entry a `safecall` context manager, a coroutine, a `traverse` generator and a
`getattr` for the hook, whether the entry has the hook or not (~3.6 µs per entry per
event here), and a keep-alive request is about four events. `Dispatch` is one entry
whose sub-addons are ours; for each hook it calls, in order, only the sub-addons that
define it, a list made once when it is built.

What mitmproxy 11.0 does per chain entry, `Dispatch` does per sub-addon (see
`mitmproxy.addonmanager`):

- Each call is guarded on its own: an exception is logged as `safecall` logs it
  ("Addon error: ...") and the next sub-addon still runs, so a failing hook never skips
  a later one (FinalGuard, SecretSwap's guard). `AddonHalt` and `OptionsError` pass
  through as `safecall` lets them: the first ends the event for everything after it,
  the second fails the option update.
- An awaitable a hook returns is awaited before the next sub-addon runs. From
  synchronous code (`addons.trigger`: `configure`, some `update`s), an `async def`
  hook is refused with an error and the rest still run.
- Nothing is checked between sub-addons: a hook that sets `flow.response` or kills the
  flow stops no later hook, as between chain entries.
- `load` registers each sub-addon with `master.addons.register`: its `load`, its
  options and commands, and its name (`ctx.master.addons.get(name)` finds it).
  `configure`, `running` and `done` reach each sub-addon in order like any other hook.
  (`master.addons.remove` of a `Dispatch` would leave those names registered; nothing
  removes ours.)

Hooks are looked up once, when the `Dispatch` is built: a sub-addon that adds or
replaces a hook attribute later is not seen. panopticon's addons do not; the operator's
addons, which may, are not dispatched (`install`). Sub-addons' own `addons` attributes
are followed as mitmproxy's `traverse` does.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

# Every module that defines mitmproxy hooks, so that `hooks.all_hooks` is complete.
import mitmproxy.addonmanager  # noqa: F401  (load)
import mitmproxy.log  # noqa: F401  (add_log)
import mitmproxy.proxy.layers  # noqa: F401  (http, dns, tcp, udp, tls, websocket, quic)
import mitmproxy.proxy.server_hooks  # noqa: F401
from mitmproxy import exceptions, hooks

# Where and how mitmproxy's safecall logs an addon's exception: the same line for the
# operator whether one of ours is dispatched here or by mitmproxy.
_mitm_logger = logging.getLogger("mitmproxy.addonmanager")
_PASS = (exceptions.AddonHalt, exceptions.OptionsError)
_INVOKE_SYNC = mitmproxy.addonmanager.AddonManager.invoke_addon_sync.__code__


def _log_error() -> None:
    etype, value, tb = sys.exc_info()
    _mitm_logger.error(f"Addon error: {value}", exc_info=(etype, value, tb))


def _flat(addons: Iterable[Any]) -> list:
    out = []
    for a in addons:
        out.append(a)
        if hasattr(a, "addons"):
            out.extend(_flat(a.addons))
    return out


def _handler(addon: Any, name: str) -> Callable | None:
    """The hook `name` of `addon` as mitmproxy's `_iter_hooks` would find it."""
    func = getattr(addon, name, None)
    if not func or isinstance(func, types.ModuleType):
        return None
    if not callable(func):
        raise exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")
    return func


def _caller(name: str, funcs: tuple[Callable, ...]) -> Callable:
    """One hook that calls `funcs` in order, each in its own guard.

    Synchronous until a hook returns an awaitable: then it returns a coroutine that
    awaits it and goes on with the rest (mitmproxy awaits what a hook returns). Called
    from mitmproxy's synchronous `invoke_addon_sync` (`addons.trigger`), it does what
    that does per addon: an `async def` hook is refused with an error and skipped,
    what a hook returns is ignored, and the rest still run."""
    is_async = tuple(inspect.iscoroutinefunction(f) for f in funcs)

    async def rest(pending, i: int, args: tuple) -> None:
        try:
            await pending
        except _PASS:
            raise
        except Exception:
            _log_error()
        for func in funcs[i:]:
            try:
                res = func(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
            except _PASS:
                raise
            except Exception:
                _log_error()

    def call(*args):
        in_sync = None  # whether mitmproxy calls from synchronous code: asked when it matters
        for i, func in enumerate(funcs):
            if is_async[i]:
                if in_sync is None:
                    in_sync = sys._getframe(1).f_code is _INVOKE_SYNC
                if in_sync:
                    try:
                        raise exceptions.AddonManagerError(
                            f"Async handler {name} ({func}) cannot be called from sync context")
                    except exceptions.AddonManagerError:
                        _log_error()
                    continue
            try:
                res = func(*args)
            except _PASS:
                raise
            except Exception:
                _log_error()
                continue
            if res is not None and inspect.isawaitable(res):
                if in_sync is None:
                    in_sync = sys._getframe(1).f_code is _INVOKE_SYNC
                if not in_sync:
                    return rest(res, i + 1, args)
        return None

    call.__name__ = call.__qualname__ = name
    return call


class Dispatch:
    """One chain entry that runs `addons` (panopticon's, in the order they must run)."""

    def __init__(self, name: str, addons: Iterable[Any]):
        self.name = name
        self.subs = tuple(addons)  # not `addons`: mitmproxy would traverse it per event
        flat = _flat(self.subs)
        self.hooks: dict[str, tuple[Callable, ...]] = {}
        for hook in hooks.all_hooks:
            if hook == "load":
                continue  # `load` registers each sub-addon
            funcs = tuple(f for f in (_handler(a, hook) for a in flat) if f is not None)
            if funcs:
                self.hooks[hook] = funcs
                setattr(self, hook, _caller(hook, funcs))

    def __repr__(self) -> str:
        return f"Dispatch({self.name}: {', '.join(type(a).__name__ for a in self.subs)})"

    def load(self, loader) -> None:
        for a in self.subs:
            loader.master.addons.register(a)


def expand(chain: Iterable[Any]) -> list:
    """`chain` (mitmproxy's addon chain) with each `Dispatch` replaced by its sub-addons:
    the order in which addons see events."""
    out = []
    for a in chain:
        out.extend(a.subs if isinstance(a, Dispatch) else (a,))
    return out


def _flattenable(entry: Any) -> bool:
    """mitmproxy's own addons, ours (Dispatch), and the proxy's own small ones; never an
    operator's addon or the boundary's guards around them, whose hooks may change."""
    if isinstance(entry, Dispatch):
        return True
    module = type(entry).__module__
    return module.startswith("mitmproxy.") or module in ("panopticond.proxy_main",)


def flatten(master) -> None:
    """Before the master runs: each run of flattenable entries of its chain (mitmproxy's
    own addons and ours) becomes one `Dispatch`, in the same order. mitmproxy's
    DumpMaster has ~35 addons of its own, most of which define few hooks, and each costs
    its dispatch per event (issue 8): this is most of what a bare mitmdump spends on its
    addons. Entries already loaded stay registered by name (nothing is loaded again)."""
    out: list = []
    run: list = []
    n = 0

    def close_run() -> None:
        nonlocal n
        if run:
            out.append(Dispatch(f"chain_dispatch_{n}", expand(run)))
            n += 1
            run.clear()

    for entry in master.addons.chain:
        if _flattenable(entry):
            run.append(entry)
        else:
            close_run()
            out.append(entry)
    close_run()
    master.addons.chain = out
