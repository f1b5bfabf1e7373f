"""The operator's own mitmproxy addons: loaded fail-closed, boxed between two guards.

`addons = ["/etc/panopticon/addons/compliance.py"]` in the config. Each script is an
ordinary mitmproxy addon script (a module with `addons = [...]`, or hooks at module
level) and runs in the proxy, after panopticon's enforcement and before its final
guard, so it sees every decision and can make it stricter, never looser:

    from panopticond.addons.operator_addons import annotate, refuse

    def requestheaders(flow):
        if flow.request.method == "DELETE":
            refuse(flow, "no deletions on Fridays")
        annotate(flow, ticket="OPS-42")

Refuse in `requestheaders` to answer with a 403: by `request` the body may already be
streaming upstream (large bodies, secret swapping), and a refusal then kills the
connection instead.

- Loading (`load_scripts`): each file must be root's alone (`panopticond.trusted`),
  is compiled from its source (no bytecode cache is read) and executed once; any error
  ends the proxy before it reports ready, with the script's name in the message.
  Its folder is not put on the import path.
- `OperatorAddon` wraps each addon. An exception in a flow hook denies that flow
  (mitmproxy would log it and let the flow continue); one in `load` stops the proxy;
  one in `configure` or `running` marks the addon broken: the proxy does not report
  ready, and every later flow is denied.
- `Boundary` checks every hook call of an operator addon (so one cannot undo what
  another refused), and its `opening` and `closing` guards run right before and after
  all of them (so nothing done between events escapes either). It undoes whatever
  loosens a decision: a denied flow stays denied (its decision and local answer are
  put back), a flow nobody allowed does not become allowed, an allowed request whose
  method or path was changed is judged again (and a changed destination is refused),
  TLS interception, the chosen protocol layer (and the layer stack) and the upstream
  address, via and SNI are put back. An operator addon may refuse (`refuse`, a local
  answer, or a kill), and annotate the log (`annotate`).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import types
import weakref
from typing import Any

from mitmproxy import connection, dns, http, tls
from mitmproxy.proxy import layer as proxy_layer
from mitmproxy.proxy import server_hooks

from panopticond import trusted
from panopticond.addons import flowlog, policyfile, verdict
from panopticond.errors import PanopticonError

logger = logging.getLogger(__name__)

BY = "operator"
LIFECYCLE = ("load", "configure", "running", "done")
_FLOW_PHASES = {"requestheaders": "requestheaders", "request": "request"}


# --- for operator scripts --------------------------------------------------------------------


def refuse(flow, reason: str, *, status: int = 403, by: str = BY) -> None:
    """Refuse `flow` (HTTP: a local `status` answer, or a kill once that is unsafe; DNS:
    REFUSED), logged as a denial with `reason`. A flow already denied keeps its reason."""
    v = verdict.get(flow)
    if v is not None and v.get("decision") == "deny":
        return
    host = v.get("host") if v else None
    if isinstance(flow, http.HTTPFlow):
        if flow.response is not None:
            phase = "responseheaders"  # the upstream answered: only a kill stops it now
        elif flow.request.raw_content is None:
            phase = "requestheaders"
        else:
            phase = "request"
        verdict.deny_http(
            flow, status, f"panopticon: request refused: {_shown(reason)}.\n",
            phase=phase, reason=reason, host=host, by=by,
        )
    elif isinstance(flow, dns.DNSFlow):
        verdict.answer_dns(flow, dns.response_codes.REFUSED, reason=reason, host=host, by=by)
    else:
        verdict.record(flow, allowed=False, reason=reason, host=host, by=by)
        verdict.kill(flow)


def _shown(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:500])


def annotate(flow, **notes: Any) -> None:
    """Add `notes` (JSON-able values) to the `notes` field of the flow's log record."""
    extra = flow.metadata.get(flowlog.EXTRA)
    merged = dict((extra or {}).get("notes") or {})
    merged.update(notes)
    flowlog.annotate(flow, notes=merged)


# --- loading ---------------------------------------------------------------------------------


def load_scripts(paths, reader_gid: int | None = None) -> list[OperatorAddon]:
    """Load every script in `paths`, in order; PanopticonError on the first problem."""
    out: list[OperatorAddon] = []
    for i, path in enumerate(paths):
        trusted.check(path, "operator addon", reader_gid)
        stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        module_name = f"panopticon_operator_{i}_{stem}"
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                source = f.read()
            if (st.st_uid, st.st_mode & 0o022) != (0, 0):
                raise PanopticonError(f"operator addon {path} changed while it was loaded")
            module = types.ModuleType(module_name)
            module.__file__ = path
            sys.modules[module_name] = module
            exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102 - root's own code
        except PanopticonError:
            raise
        except BaseException as e:
            sys.modules.pop(module_name, None)
            where = ""
            tb = e.__traceback__
            while tb is not None:
                if tb.tb_frame.f_code.co_filename == path:
                    where = f" (line {tb.tb_lineno})"
                tb = tb.tb_next
            raise PanopticonError(
                f"operator addon {path} failed to load{where}: {type(e).__name__}: {e}",
                hint="fix the script, or remove it from addons in the config; "
                "the jail does not start without it",
            ) from None
        inner = getattr(module, "addons", None)
        if inner is None:
            inner = [module]
        for j, addon in enumerate(_flatten(inner)):
            out.append(OperatorAddon(addon, f"{path}#{j}" if j else path))
    return out


def _flatten(addons) -> list:
    out = []
    for a in addons:
        out.append(a)
        children = getattr(a, "addons", None)
        if children and not isinstance(a, types.ModuleType):
            out.extend(_flatten(children))
    return out


# --- the wrapper -----------------------------------------------------------------------------


class OperatorAddon:
    """How mitmproxy sees an operator addon: errors close instead of being logged away,
    and each hook call is checked on its own by the `Boundary` (set by `all_addons`), so
    one operator addon cannot undo what another refused either."""

    def __init__(self, inner: Any, origin: str):
        self._inner = inner
        self.origin = origin
        self.name = f"operator:{origin}"
        self.broken: str | None = None
        self.boundary: Boundary | None = None

    def __repr__(self) -> str:
        return f"OperatorAddon({self.origin})"

    def __getattr__(self, attr: str):
        # Sub-addons are flattened by load_scripts and wrapped one by one.
        if attr.startswith("_") or attr == "addons":
            raise AttributeError(attr)
        value = getattr(self._inner, attr)
        if not callable(value) or isinstance(value, (type, types.ModuleType)):
            return value
        if attr in LIFECYCLE:
            return self._lifecycle(attr, value)
        return self._hook(attr, value)

    def _lifecycle(self, attr: str, func):
        def call(*args):
            try:
                return func(*args)
            except Exception as e:
                if attr == "load" or type(e).__name__ == "OptionsError":
                    raise
                self.broken = f"{attr} failed: {type(e).__name__}: {e}"
                logger.exception(f"panopticon: operator addon {self.origin}: {self.broken}; "
                                 "denying every request it sees")
        return call

    def _hook(self, attr: str, func):
        if inspect.iscoroutinefunction(func):
            async def acall(*args):
                if self._refuse_if_broken(args):
                    return None
                before = self._before(args)
                try:
                    return await func(*args)
                except Exception:
                    self._failed(attr, args)
                finally:
                    self._after(args, before, attr)
            return acall

        def call(*args):
            if self._refuse_if_broken(args):
                return None
            before = self._before(args)
            try:
                return func(*args)
            except Exception:
                self._failed(attr, args)
            finally:
                self._after(args, before, attr)
        return call

    def _before(self, args):
        if self.boundary is None or not args:
            return None
        return self.boundary.before(args[0])

    def _after(self, args, before, hook: str) -> None:
        if self.boundary is not None and args:
            self.boundary.after(args[0], before, hook)

    def _refuse_if_broken(self, args) -> bool:
        if self.broken is None:
            return False
        flow = args[0] if args else None
        if _is_flow(flow):
            refuse(flow, f"operator addon {self.origin} is broken", by=self.name)
        return True

    def _failed(self, attr: str, args) -> None:
        logger.exception(f"panopticon: operator addon {self.origin}: {attr} failed; denying")
        arg = args[0] if args else None
        try:
            if _is_flow(arg):
                v = verdict.get(arg)
                if isinstance(arg, http.HTTPFlow) and attr not in _FLOW_PHASES:
                    verdict.record(arg, allowed=False, reason="operator addon failed",
                                   host=v.get("host") if v else None, by=self.name)
                    verdict.kill(arg)
                else:
                    refuse(arg, "operator addon failed", by=self.name)
            elif isinstance(arg, server_hooks.ServerConnectionHookData):
                arg.server.error = "panopticon: operator addon failed"
        except Exception:
            logger.exception("panopticon: could not deny after an operator addon failed")
            if _is_flow(arg):
                verdict.kill(arg)


def _is_flow(x) -> bool:
    return isinstance(x, (http.HTTPFlow, dns.DNSFlow)) or (
        hasattr(x, "metadata") and hasattr(x, "kill") and hasattr(x, "client_conn")
    )


_CONN_TYPES = (tls.ClientHelloData, proxy_layer.NextLayer, server_hooks.ServerConnectionHookData)


# --- the boundary ----------------------------------------------------------------------------


class _State:
    """What a flow looked like before an operator addon got it."""

    __slots__ = ("verdict", "answered", "response", "identity", "msg", "error")

    def __init__(self, flow, keep_answer: bool = False):
        v = verdict.get(flow)
        self.verdict = dict(v) if v is not None else None
        answer = getattr(flow, "response", None)
        self.answered = answer is not None
        # A copy of the answer only where it must be put back (a denial): it can be large.
        self.response = _clone(answer) if keep_answer and answer is not None else None
        self.identity = _identity(flow)
        self.msg = id(flow.request) if isinstance(flow, dns.DNSFlow) else None
        self.error = flow.error is not None


def _clone(response):
    # Not .copy(): a DNS message's copy gets a new id, and the client drops the answer.
    return type(response).from_state(response.get_state())


def _answer(response) -> tuple | bytes:
    """What an answer says (not when it was sent)."""
    if isinstance(response, http.Response):
        return (response.status_code, tuple(response.headers.fields), response.raw_content)
    return response.packed


def _identity(flow) -> tuple | None:
    if not isinstance(flow, http.HTTPFlow):
        return None
    r = flow.request
    return (r.scheme, r.host, r.port, r.host_header, r.authority, r.method, r.path)


class Boundary:
    """Checks what operator addons did, around each of their hook calls (`before`,
    `after`) and around all of them (`opening` right before the first, `closing` right
    after the last: they also see what happened between events); see the module
    docstring for what is undone."""

    def __init__(self, policy: policyfile.PolicyFile | None = None):
        self.policy = policy or policyfile.PolicyFile()
        self.opening = _Guard(self, "panopticon_operator_opening")
        self.closing = _Guard(self, "panopticon_operator_closing")
        # Flows panopticon (or an operator addon) denied: denied for good. Weak keys, so
        # nothing is kept past the flow's life.
        self.denied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # What `opening` saw, for `closing`, per flow or connection event object.
        self.entry: dict[int, tuple[Any, Any]] = {}
        self.active = False  # without operator addons there is nothing to check

    def adopt(self, operator) -> None:
        """Check each hook call of these (OperatorAddon) on its own, too."""
        for addon in operator:
            addon.boundary = self
            self.active = True

    def before(self, arg) -> Any:
        if _is_flow(arg):
            return self._enter(arg)
        if isinstance(arg, _CONN_TYPES):
            return _conn_snapshot(arg)
        return None

    def after(self, arg, before, hook: str) -> None:
        if _is_flow(arg):
            self._leave(arg, before, hook)
        elif isinstance(arg, _CONN_TYPES) and before is not None:
            self._leave_conn(arg, before)

    def open(self, arg, hook: str) -> None:
        if self.active:
            self.entry[id(arg)] = (arg, self.before(arg))

    def close(self, arg, hook: str) -> None:
        if not self.active:
            return
        held = self.entry.pop(id(arg), None)
        before = held[1] if held is not None and held[0] is arg else None
        self.after(arg, before, hook)

    # -- flows

    def _enter(self, flow) -> _State:
        self._keep_denied(flow)
        v = verdict.get(flow)
        if v is not None and v.get("decision") != "allow" and flow not in self.denied:
            self.denied[flow] = _State(flow, keep_answer=True)
        return _State(flow)

    def _leave(self, flow, before: _State | None, hook: str) -> None:
        if self._keep_denied(flow) or before is None:
            return
        v = verdict.get(flow)
        was = before.verdict.get("decision") if before.verdict else None
        now = v.get("decision") if v else None
        if was != "allow":
            if now == "allow":
                # Nobody but an operator addon allowed it: back to no decision, and the
                # final guard denies it.
                logger.warning("panopticon: an operator addon tried to allow a flow; undone")
                if before.verdict is not None:
                    flow.metadata[verdict.KEY] = dict(before.verdict)
                else:
                    flow.metadata.pop(verdict.KEY, None)
            elif now is not None:
                self.denied[flow] = _State(flow, keep_answer=True)
            return
        if now != "allow":
            if now is not None:
                self.denied[flow] = _State(flow, keep_answer=True)
            return
        if isinstance(flow, http.HTTPFlow):
            self._judge_again(flow, before, hook)

    def _judge_again(self, flow: http.HTTPFlow, before: _State, hook: str) -> None:
        host = (before.verdict or {}).get("host")
        if flow.error and not before.error:
            verdict.record(flow, allowed=False, reason="killed by an operator addon",
                           host=host, by=BY)
            self.denied[flow] = _State(flow, keep_answer=True)
            return
        if hook in _FLOW_PHASES and not before.answered and flow.response is not None:
            verdict.record(flow, allowed=False, reason="answered by an operator addon",
                           host=host, by=BY, local=True)
            self.denied[flow] = _State(flow, keep_answer=True)
            return
        now = _identity(flow)
        if now == before.identity or before.identity is None:
            return
        d = None
        if now[:5] != before.identity[:5]:
            reason = "an operator addon changed the request's destination"
        else:
            d = self.policy.decide(host or "", flow.request.method, flow.request.path)
            if d.allowed:
                return
            reason = f"after an operator addon changed it: {d.reason}"
        logger.warning(f"panopticon: {reason}; refused")
        verdict.deny_http(flow, 403, f"panopticon: request blocked: {reason}.\n",
                          phase=_FLOW_PHASES.get(hook, "responseheaders"), reason=reason,
                          host=host, by=BY)
        if d is not None:
            verdict.note(flow, d)
        self.denied[flow] = _State(flow, keep_answer=True)

    def _keep_denied(self, flow) -> bool:
        """Put back a denial that something undid; True if the flow is denied for good."""
        state = self.denied.get(flow)
        if state is None:
            return False
        if state.msg is not None and state.msg != id(flow.request):
            # A later DNS query on a reused flow: judged on its own.
            del self.denied[flow]
            return False
        if verdict.get(flow) != state.verdict:
            flow.metadata[verdict.KEY] = dict(state.verdict)
        if state.response is not None:
            if flow.response is None or _answer(flow.response) != _answer(state.response):
                flow.response = _clone(state.response)
        elif getattr(flow, "response", None) is not None and flow.live:
            # It was denied by a kill, and something answered it since: kill it again.
            flow.response = None
            verdict.kill(flow)
        return True

    # -- connections

    def _leave_conn(self, data, before: tuple) -> None:
        if before == _conn_snapshot(data):
            return
        logger.warning(f"panopticon: an operator addon changed {type(data).__name__}; undone")
        if isinstance(data, tls.ClientHelloData):
            data.ignore_connection, data.establish_server_tls_first = before
        elif isinstance(data, proxy_layer.NextLayer):
            # Building a layer pushes it onto the context's stack: pop what they built.
            data.layer = before[0]
            data.context.layers[:] = before[1]
        elif isinstance(data, server_hooks.ServerConnectionHookData):
            address, via, sni, error = before
            s: connection.Server = data.server
            s.address, s.via, s.sni = address, via, sni
            if error and not s.error:
                s.error = error


def _conn_snapshot(data) -> tuple:
    if isinstance(data, tls.ClientHelloData):
        return (data.ignore_connection, data.establish_server_tls_first)
    if isinstance(data, proxy_layer.NextLayer):
        return (data.layer, list(data.context.layers))
    s = data.server
    return (s.address, s.via, s.sni, s.error)


_HOOKS = ("requestheaders", "request", "responseheaders", "response", "http_connect",
          "dns_request", "dns_response", "tcp_start", "tcp_message", "udp_start",
          "udp_message", "websocket_start", "websocket_message", "tls_clienthello",
          "next_layer", "server_connect")


class _Guard:
    """`opening` or `closing`: one addon with every hook of `_HOOKS`."""

    def __init__(self, boundary: Boundary, name: str):
        self.boundary = boundary
        self.name = name
        self._closing = name.endswith("closing")

    def __repr__(self) -> str:
        return self.name

    def _guard(self, arg, hook: str) -> None:
        try:
            if self._closing:
                self.boundary.close(arg, hook)
            else:
                self.boundary.open(arg, hook)
        except Exception:
            logger.exception(f"panopticon: the operator boundary failed in {hook}; denying")
            if _is_flow(arg):
                verdict.record(arg, allowed=False, reason="internal error in the proxy",
                               host=None, by=BY)
                verdict.kill(arg)
            elif isinstance(arg, server_hooks.ServerConnectionHookData):
                arg.server.error = "panopticon: internal error in the proxy"


def _hook_method(hook: str):
    def call(self, arg):
        self._guard(arg, hook)
    call.__name__ = hook
    return call


for _hook in _HOOKS:
    setattr(_Guard, _hook, _hook_method(_hook))
del _hook
