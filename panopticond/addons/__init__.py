"""panopticon's mitmproxy addons, added to the proxy's master directly (never as `-s`
scripts, whose import failures mitmproxy logs and then runs without).

In order: `Inbound` decides on requests that came in through an inbound route (and
leaves the rest alone), `Enforce` judges connections and requests and gates upstream connections,
`Binding` chooses the address each allowed name is dialled at (and relays passthrough
and port-rule connections), `SecretGuard` judges what the agent sends for secrets and
DLP and redacts real values coming back, `SecretDns` and `DnsFilter` answer DNS, `AddHeaders` sets the operator's headers on allowed requests,
the operator's own addons run between the two guards of `operator_addons.Boundary`
(which undo anything they do that loosens a decision), `FlowLog` writes one line per
flow, `SecretSwap` puts the real secret values in, `FinalGuard` denies whatever nobody
allowed (secretswap.py). Enforce and DnsFilter share one policy file; Enforce and
FinalGuard share the approvals of the `server_connect` gate.

Use `install(master)`: a DumpMaster already holds mitmproxy's own `dnsresolver`,
which would resolve a query before `DnsFilter` sees it; `install` puts DnsFilter
ahead of it. Everything else of ours must run after mitmproxy's addons (Enforce
overrides `next_layer` and `tls_clienthello` choices) and stays at the end.
`install` adds them as `dispatch.Dispatch` entries (one for the two DNS addons, one
for the rest), each running its addons in this order (issue 8: mitmproxy's per-entry
dispatch cost more than most of our hooks).
"""

from __future__ import annotations

from panopticond.addons.binding import Binding
from panopticond.addons.dispatch import Dispatch
from panopticond.addons.dnsfilter import DnsFilter
from panopticond.addons.enforce import Enforce
from panopticond.addons.finalguard import FinalGuard
from panopticond.addons.flowlog import FlowLog
from panopticond.addons.gcfreeze import GcFreeze
from panopticond.addons.headers import AddHeaders
from panopticond.addons.inbound import Inbound
from panopticond.addons.operator_addons import Boundary
from panopticond.addons.policyfile import PolicyFile
from panopticond.addons.secretswap import SecretDns, SecretGuard, Secrets, SecretSwap
from panopticond.addons.verdict import Approvals

__all__ = ["DnsFilter", "Enforce", "FinalGuard", "FlowLog", "all_addons", "chain_entries",
           "install"]


def all_addons(operator: list | tuple = ()) -> list:
    """Fresh instances of every addon, wired together, in the order they must run;
    `operator`: the operator's addons (`operator_addons.load_scripts`)."""
    policy = PolicyFile()
    approvals = Approvals()
    boundary = Boundary(policy)
    boundary.adopt(operator)
    secrets = Secrets()
    return [
        Inbound(approvals),  # before Enforce, which skips flows that carry a decision
        Enforce(policy, approvals),
        Binding(policy, approvals),  # after Enforce, whose decision it binds to an address
        # Judges on the name Enforce checked, before anything else sees the request.
        SecretGuard(secrets),
        SecretDns(secrets),  # moved ahead of mitmproxy's resolver with DnsFilter
        DnsFilter(policy),
        AddHeaders(policy),
        # Without operator addons the guards check nothing; each would still cost a
        # dispatch of every event (issue 8).
        *((boundary.opening, *operator, boundary.closing) if operator else ()),
        FlowLog(),
        # The real values go in last: no addon of the operator's sees one.
        SecretSwap(secrets),
        FinalGuard(approvals),
    ]


# What `install` dispatches: panopticon's own addons. The operator's addons and the
# boundary's guards around them stay chain entries of their own: an operator addon may
# grow or replace hooks after load (mitmproxy looks them up per event, `Dispatch` once),
# and the boundary's checks were written against mitmproxy's per-entry dispatch. They
# are off the default path; with them the chain has two `Dispatch` entries around them.
_OURS = (GcFreeze, Inbound, Enforce, Binding, SecretGuard, SecretDns, DnsFilter, AddHeaders,
         FlowLog, SecretSwap, FinalGuard)


def chain_entries(addons: list) -> list:
    """`addons` as chain entries: each run of ours one `Dispatch`, the rest as they are."""
    out: list = []
    run: list = []
    names = iter(["panopticon_dispatch", "panopticon_dispatch_2"])  # ours, operator, ours
    for a in [*addons, None]:
        if isinstance(a, _OURS):
            run.append(a)
            continue
        if run:
            out.append(Dispatch(next(names), run))
            run = []
        if a is not None:
            out.append(a)
    return out


def install(master, operator: list | tuple = ()) -> list:
    """Add `all_addons(operator)` to `master` (before it runs), SecretDns and DnsFilter
    ahead of mitmproxy's DNS resolver, as `Dispatch` entries (`_OURS`). Returns the
    addons."""
    addons = all_addons(operator)
    resolver = master.addons.get("dnsresolver")
    chain = master.addons.chain
    early = [a for a in addons if isinstance(a, (SecretDns, DnsFilter))]
    if resolver not in chain:
        early = []  # nothing to be ahead of: they keep their place among the others
    entries = chain_entries([GcFreeze(), *(a for a in addons if not any(a is e for e in early))])
    first = Dispatch("panopticon_dispatch_dns", early) if early else None
    master.addons.add(*([first] if first else []), *entries)
    if first is not None:
        # Rebind rather than mutate: an event being dispatched keeps iterating the old list.
        reordered = [a for a in master.addons.chain if a is not first]
        at = reordered.index(resolver)
        reordered[at:at] = [first]
        master.addons.chain = reordered
    return addons
