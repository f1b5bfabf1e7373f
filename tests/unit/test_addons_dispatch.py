"""Dispatch: panopticon's addons as one chain entry, each hook call guarded on its own,
with the semantics of mitmproxy's own per-entry dispatch."""

import asyncio
import json
import logging

import pytest
from mitmproxy import dns, exceptions, hooks, http, options
from mitmproxy.proxy.layers import dns as dns_layer
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils
from mitmproxy.tools.dump import DumpMaster

import panopticond.addons as pa
from panopticond.addons import dispatch, verdict
from panopticond.addons.dispatch import Dispatch
from panopticond.policy import Policy

DEST = "198.51.100.7"


@pytest.fixture
def paths(tmp_path):
    policy = tmp_path / "policy.json"
    compiled = Policy.build("x", ["allowed.example"], [], "agents.x.allow").to_dict()
    policy.write_text(json.dumps(compiled))
    return policy, tmp_path / "requests.jsonl"


def configured(entries, paths):
    tctx = taddons.context(*entries)
    policy, log = paths
    tctx.options.update(panopticon_policy=str(policy), panopticon_log=str(log),
                        panopticon_instance="x")
    return tctx


def log_lines(log):
    return [json.loads(x) for x in log.read_text().splitlines()]


HTTP_HOOKS = (http_layer.HttpRequestHeadersHook, http_layer.HttpRequestHook,
              http_layer.HttpResponseHeadersHook, http_layer.HttpResponseHook)


def run_http_sync(master, f):
    """As test_addons_init.run_http: mitmproxy's synchronous `trigger`."""
    for hook in HTTP_HOOKS[:2]:
        master.addons.trigger(hook(f))
        if f.error:
            master.addons.trigger(http_layer.HttpErrorHook(f))
            return f
    if f.response is None:
        f.response = tutils.tresp()
    for hook in HTTP_HOOKS[2:]:
        master.addons.trigger(hook(f))
    return f


async def run_http_async(master, f):
    """As the proxy does: `handle_lifecycle`, which awaits async hooks."""
    for hook in HTTP_HOOKS[:2]:
        await master.addons.handle_lifecycle(hook(f))
        if f.error:
            await master.addons.handle_lifecycle(http_layer.HttpErrorHook(f))
            return f
    if f.response is None:
        f.response = tutils.tresp()
    for hook in HTTP_HOOKS[2:]:
        await master.addons.handle_lifecycle(hook(f))
    return f


def plain(host, transparent=False):
    f = tflow.tflow(req=tutils.treq(host=DEST, port=80, headers=http.Headers(host=host),
                                    content=b""))
    if transparent:
        f.client_conn.proxy_mode = ProxyMode.parse("transparent")
    return f


# --- the mechanism, with small addons --------------------------------------------------------


class Rec:
    """A sub-addon that records its calls in `calls` (shared)."""

    def __init__(self, tag, calls):
        self.tag = tag
        self.calls = calls
        self.name = f"rec_{tag}"


class Req(Rec):
    def request(self, f):
        self.calls.append((self.tag, "request"))


class Resp(Rec):
    def response(self, f):
        self.calls.append((self.tag, "response"))


class Both(Req, Resp):
    pass


class AsyncReq(Rec):
    async def request(self, f):
        self.calls.append((self.tag, "start"))
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        self.calls.append((self.tag, "end"))


class Raises(Rec):
    def request(self, f):
        self.calls.append((self.tag, "request"))
        raise RuntimeError(f"boom {self.tag}")


class AsyncRaises(Rec):
    async def request(self, f):
        await asyncio.sleep(0)
        self.calls.append((self.tag, "request"))
        raise RuntimeError(f"boom {self.tag}")


def test_only_the_subaddons_with_the_hook_are_called_in_order():
    calls = []
    subs = [Both("a", calls), Rec("none", calls), Resp("b", calls), Req("c", calls)]
    d = Dispatch("t", subs)
    assert set(d.hooks) == {"request", "response"}
    assert [f.__self__.tag for f in d.hooks["request"]] == ["a", "c"]
    assert [f.__self__.tag for f in d.hooks["response"]] == ["a", "b"]
    assert not hasattr(d, "error") and not hasattr(d, "addons")
    with taddons.context(d) as tctx:
        f = tflow.tflow(resp=True)
        tctx.master.addons.trigger(http_layer.HttpRequestHook(f))
        tctx.master.addons.trigger(http_layer.HttpResponseHook(f))
    assert calls == [("a", "request"), ("c", "request"), ("a", "response"), ("b", "response")]


def test_async_hooks_are_awaited_in_order():
    calls = []

    async def go():
        d = Dispatch("t", [Req("a", calls), AsyncReq("b", calls), Req("c", calls),
                           AsyncReq("d", calls), Req("e", calls)])
        with taddons.context(d) as tctx:
            await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))

    asyncio.run(go())
    assert calls == [("a", "request"), ("b", "start"), ("b", "end"), ("c", "request"),
                     ("d", "start"), ("d", "end"), ("e", "request")]


def test_from_sync_code_an_async_hook_is_refused_and_the_rest_run_as_in_mitmproxy(caplog):
    def run(entries, calls):
        with taddons.context(*entries) as tctx:
            tctx.master.addons.trigger(http_layer.HttpRequestHook(tflow.tflow()))
        return calls

    flat_calls, calls = [], []
    flat = run([Req("a", flat_calls), AsyncReq("b", flat_calls), Req("c", flat_calls)],
               flat_calls)
    caplog.clear()
    ours = run([Dispatch("t", [Req("a", calls), AsyncReq("b", calls), Req("c", calls)])], calls)
    assert ours == flat == [("a", "request"), ("c", "request")]
    assert "cannot be called from sync context" in caplog.text


@pytest.mark.parametrize("raising", [Raises, AsyncRaises])
def test_an_exception_is_logged_and_the_rest_still_run(raising, caplog):
    calls = []

    async def go():
        d = Dispatch("t", [Req("a", calls), raising("x", calls), AsyncReq("b", calls),
                           raising("y", calls), Req("c", calls)])
        with taddons.context(d) as tctx:
            await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))

    with caplog.at_level(logging.ERROR):
        asyncio.run(go())
    assert calls == [("a", "request"), ("x", "request"), ("b", "start"), ("b", "end"),
                     ("y", "request"), ("c", "request")]
    # The line mitmproxy's safecall writes.
    assert "Addon error: boom x" in caplog.text and "Addon error: boom y" in caplog.text


def test_addon_halt_ends_the_event_for_everything_after():
    calls = []

    class Halts(Rec):
        def request(self, f):
            calls.append((self.tag, "request"))
            raise exceptions.AddonHalt()

    after = Req("after", calls)
    with taddons.context(Dispatch("t", [Req("a", calls), Halts("h", calls), Req("c", calls)]),
                         after) as tctx:
        tctx.master.addons.trigger(http_layer.HttpRequestHook(tflow.tflow()))
    assert calls == [("a", "request"), ("h", "request")]


def test_a_response_set_by_one_hook_stops_no_other():
    calls = []

    class Answers(Rec):
        def request(self, f):
            f.response = tutils.tresp(status_code=403)

    class Kills(Rec):
        def request(self, f):
            f.kill()

    async def go():
        d = Dispatch("t", [Answers("a", calls), Kills("k", calls), Req("c", calls)])
        with taddons.context(d) as tctx:
            f = tflow.tflow()
            await tctx.master.addons.handle_lifecycle(http_layer.HttpRequestHook(f))
            return f

    f = asyncio.run(go())
    assert calls == [("c", "request")] and f.response.status_code == 403


def test_options_are_registered_and_configure_reaches_each_in_order():
    calls = []

    class Opt(Rec):
        def load(self, loader):
            loader.add_option(f"pnt_{self.tag}", int, 0, "test")

        def configure(self, updated):
            calls.append((self.tag, sorted(u for u in updated if u.startswith("pnt_"))))
            if getattr(__import__("mitmproxy").ctx.options, f"pnt_{self.tag}") < 0:
                raise exceptions.OptionsError(f"pnt_{self.tag} must be >= 0")

    a, b = Opt("a", calls), Opt("b", calls)
    with taddons.context(Dispatch("t", [a, b])) as tctx:
        assert tctx.master.addons.get("rec_a") is a and tctx.master.addons.get("rec_b") is b
        assert "pnt_a" in tctx.options and "pnt_b" in tctx.options
        calls.clear()
        tctx.options.update(pnt_b=2)
        assert calls == [("a", ["pnt_b"]), ("b", ["pnt_b"])]
        calls.clear()
        # An OptionsError fails the update (and rolls it back), as from its own entry.
        with pytest.raises(exceptions.OptionsError):
            tctx.options.update(pnt_a=-1)
        assert tctx.options.pnt_a == 0
        assert calls[0] == ("a", ["pnt_a"])


def test_lifecycle_reaches_each_subaddon():
    calls = []

    class Life(Rec):
        def running(self):
            calls.append((self.tag, "running"))

        def done(self):
            calls.append((self.tag, "done"))

    async def go():
        with taddons.context(Dispatch("t", [Life("a", calls), Rec("n", calls),
                                            Life("b", calls)])) as tctx:
            await tctx.master.addons.trigger_event(hooks.RunningHook())
            await tctx.master.addons.trigger_event(hooks.DoneHook())

    asyncio.run(go())
    assert calls == [("a", "running"), ("b", "running"), ("a", "done"), ("b", "done")]


def test_expand():
    a, b, c = object(), object(), object()
    assert dispatch.expand([a, Dispatch("t", [b, c]), a]) == [a, b, c, a]


# --- panopticon's addons, dispatched ---------------------------------------------------------


def test_all_addons_dispatched_are_registered_and_configured(paths):
    addons = pa.all_addons()
    enforce = next(a for a in addons if isinstance(a, pa.Enforce))
    flowlog = next(a for a in addons if isinstance(a, pa.FlowLog))
    with configured(pa.chain_entries(addons), paths) as tctx:
        assert [type(e).__name__ for e in tctx.master.addons.chain] == ["Core", "Dispatch"]
        for a in addons:
            assert tctx.master.addons.get(a.name) is a
        assert enforce.policy.policy is not None  # configure reached it
        run_http_sync(tctx.master, plain("allowed.example"))
        asyncio.run(tctx.master.addons.trigger_event(hooks.DoneHook()))
    assert flowlog.log is None  # done closed it
    assert len(log_lines(paths[1])) == 1


def scenario(master, sync):
    """Flows through `master`'s chain; what the agent got, per flow."""
    out = []
    for host in ("allowed.example", "denied.example", "allowed.example"):
        f = plain(host, transparent=not sync)
        f = run_http_sync(master, f) if sync else asyncio.run(run_http_async(master, f))
        out.append((f.response.status_code if f.response else None, f.error is not None,
                    (verdict.get(f) or {}).get("by")))
    for qtype in (dns.types.A, dns.types.TXT):
        f = tflow.tdnsflow(req=tutils.tdnsreq(
            questions=[dns.Question("allowed.example", qtype, dns.classes.IN)]))
        master.addons.trigger(dns_layer.DnsRequestHook(f))
        if f.response is None:
            f.response = f.request.succeed([])
        master.addons.trigger(dns_layer.DnsResponseHook(f))
        out.append((f.response.response_code, (verdict.get(f) or {}).get("by")))
    return out


def comparable(records):
    skip = {"time", "duration_ms", "client"}
    return [{k: v for k, v in r.items() if k not in skip} for r in records]


@pytest.mark.parametrize("sync", [True, False])
def test_dispatched_chain_behaves_as_the_flat_chain(tmp_path, paths, sync):
    def run(entries_of, sub):
        log = tmp_path / f"{sub}.jsonl"
        addons = pa.all_addons()
        binding = next(a for a in addons if type(a).__name__ == "Binding")

        async def resolve(name, family):  # never a real lookup
            return [DEST] if family == 4 else []

        binding.resolve = resolve
        with configured(entries_of(addons), (paths[0], log)) as tctx:
            got = scenario(tctx.master, sync)
        return got, comparable(log_lines(log))

    flat = run(list, "flat")
    ours = run(pa.chain_entries, "dispatched")
    assert ours == flat
    statuses = [x[0] for x in flat[0][:3]]
    assert statuses == [200, 403, 200]


class Broken(Exception):
    pass


OUR_CLASSES = ["Inbound", "Enforce", "Binding", "SecretGuard", "AddHeaders", "FlowLog",
               "SecretSwap"]


@pytest.mark.parametrize("cls", OUR_CLASSES)
@pytest.mark.parametrize("sync", [True, False])
def test_a_hook_that_raises_never_skips_finalguard(cls, sync, paths, monkeypatch):
    # Each addon's flow hooks replaced by ones that raise past its own guard.
    addons = pa.all_addons()
    target = next(a for a in addons if type(a).__name__ == cls)
    for hook in ("requestheaders", "request", "responseheaders", "response"):
        if hasattr(target, hook):
            def broken(*args, _h=hook):
                raise Broken(f"{cls}.{_h}")
            monkeypatch.setattr(target, hook, broken)
    guard = next(a for a in addons if isinstance(a, pa.FinalGuard))
    seen = []
    original = guard.requestheaders

    def spy(f):
        seen.append(f)
        original(f)

    monkeypatch.setattr(guard, "requestheaders", spy)
    with configured(pa.chain_entries(addons), paths) as tctx:
        for host in ("allowed.example", "denied.example"):
            f = plain(host, transparent=not sync)
            f = run_http_sync(tctx.master, f) if sync else asyncio.run(
                run_http_async(tctx.master, f))
            assert seen and seen[-1] is f
            if host == "denied.example" or cls == "Enforce":
                assert f.response is not None and f.response.status_code == 403
                assert not verdict.is_allowed(f)


def test_a_failing_enforce_cannot_open_through_the_dispatch(paths, monkeypatch):
    def broken(self, flow):
        raise RuntimeError("bug")

    monkeypatch.setattr(pa.Enforce, "requestheaders", broken)
    monkeypatch.setattr(pa.Enforce, "request", broken)
    with configured(pa.chain_entries(pa.all_addons()), paths) as tctx:
        f = run_http_sync(tctx.master, plain("allowed.example"))
        assert f.response.status_code == 403
        assert verdict.get(f)["by"] == "finalguard"


def names(chain):
    return [getattr(a, "name", type(a).__name__.lower()) for a in chain]


def test_install_in_a_dumpmaster_dns_addons_before_the_resolver(paths, caplog):
    async def go():
        m = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        ours = pa.install(m)
        m.options.update(panopticon_policy=str(paths[0]))
        dnsfilter = next(a for a in ours if isinstance(a, pa.DnsFilter))
        chain = names(m.addons.chain)
        assert chain.index("panopticon_dispatch_dns") == chain.index("dnsresolver") - 1
        assert chain[-1] == "panopticon_dispatch"
        assert [type(a).__name__ for a in m.addons.chain[-1].subs] == [
            "GcFreeze", "Inbound", "Enforce", "Binding", "SecretGuard", "AddHeaders",
            "FlowLog", "SecretSwap", "FinalGuard"]
        first = m.addons.get("panopticon_dispatch_dns")
        assert [type(a).__name__ for a in first.subs] == ["SecretDns", "DnsFilter"]
        # Two entries instead of twelve.
        assert sum(isinstance(a, Dispatch) for a in m.addons.chain) == 2
        assert all(m.addons.get(a.name) is a for a in ours)

        with caplog.at_level(logging.ERROR):
            dnsfilter.running()
        assert "runs after mitmproxy's DNS resolver" not in caplog.text
        # The check itself still sees through the Dispatch entries.
        m.addons.chain = [a for a in m.addons.chain if a is not first] + [first]
        with caplog.at_level(logging.ERROR):
            dnsfilter.running()
        assert "runs after mitmproxy's DNS resolver" in caplog.text

    asyncio.run(go())


def test_operator_addons_and_the_boundary_stay_entries_of_their_own():
    class Operator:
        name = "op"

        def request(self, f):
            pass

    op = Operator()
    entries = pa.chain_entries(pa.all_addons([op]))
    assert [type(e).__name__ if isinstance(e, Dispatch) else names([e])[0] for e in entries] \
        == ["Dispatch", "panopticon_operator_opening", "op", "panopticon_operator_closing",
           "Dispatch"]
    assert [type(a).__name__ for a in entries[0].subs] == [
        "Inbound", "Enforce", "Binding", "SecretGuard", "SecretDns", "DnsFilter", "AddHeaders"]
    assert [type(a).__name__ for a in entries[-1].subs] == ["FlowLog", "SecretSwap",
                                                             "FinalGuard"]
    assert entries[0].name != entries[-1].name


def test_an_operator_addon_cannot_loosen_through_the_dispatched_chain(paths):
    class Loosens:
        name = "loosens"

        def requestheaders(self, f):
            f.response = None
            verdict.record(f, allowed=True, reason="mine", host="denied.example", by="op")

    with configured(pa.chain_entries(pa.all_addons([Loosens()])), paths) as tctx:
        f = run_http_sync(tctx.master, plain("denied.example"))
    assert f.response.status_code == 403 and not verdict.is_allowed(f)


# --- flatten: mitmproxy's own addons too ----------------------------------------------------


def _dumpmaster_run(tmp_path, paths, flat, operator=()):
    """A DumpMaster as the proxy builds it (proxy_main): what allowed, denied and DNS
    flows got, the log, and the chain, with or without `flatten`."""
    log = tmp_path / f"flat-{flat}.jsonl"

    async def go():
        m = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        ours = pa.install(m, list(operator))
        binding = next(a for a in ours if type(a).__name__ == "Binding")

        async def resolve(name, family):  # never a real lookup
            return [DEST] if family == 4 else []

        binding.resolve = resolve
        before = dispatch.expand(m.addons.chain)
        if flat:
            dispatch.flatten(m)
            assert dispatch.expand(m.addons.chain) == before  # the same addons, in order
        m.options.update(panopticon_policy=str(paths[0]), panopticon_log=str(log),
                         panopticon_instance="x")
        out = []
        for host in ("allowed.example", "denied.example", "allowed.example"):
            f = await run_http_async(m, plain(host, transparent=True))
            out.append((f.response.status_code if f.response else None,
                        (verdict.get(f) or {}).get("by")))
        f = tflow.tdnsflow(req=tutils.tdnsreq(
            questions=[dns.Question("denied.example", dns.types.A, dns.classes.IN)]))
        await m.addons.handle_lifecycle(dns_layer.DnsRequestHook(f))
        out.append((f.response.response_code if f.response else None,
                    (verdict.get(f) or {}).get("by")))
        await m.addons.trigger_event(hooks.DoneHook())
        return out, list(m.addons.chain)

    got, chain = asyncio.run(go())
    return got, comparable(log_lines(log)), chain


def test_a_flattened_dumpmaster_answers_as_the_plain_one(tmp_path, paths):
    plain_got, plain_log, plain_chain = _dumpmaster_run(tmp_path, paths, flat=False)
    flat_got, flat_log, flat_chain = _dumpmaster_run(tmp_path, paths, flat=True)
    assert flat_got == plain_got and flat_log == plain_log
    assert [x[0] for x in flat_got[:3]] == [200, 403, 200]
    assert flat_got[3][0] != dns.response_codes.NOERROR  # the denied name: refused
    assert len(plain_chain) > 30 and len(flat_chain) == 1


def test_flatten_leaves_operator_addons_and_the_boundary_entries_of_their_own(tmp_path, paths):
    class Operator:
        name = "op"

        def request(self, f):
            pass

    op = Operator()
    _, _, chain = _dumpmaster_run(tmp_path, paths, flat=True, operator=[op])
    kinds = ["D" if isinstance(e, Dispatch) else names([e])[0] for e in chain]
    assert kinds == ["D", "panopticon_operator_opening", "op", "panopticon_operator_closing", "D"]
