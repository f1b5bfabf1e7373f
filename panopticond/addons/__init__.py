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
"""

from __future__ import annotations

from panopticond.addons.binding import Binding
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

__all__ = ["DnsFilter", "Enforce", "FinalGuard", "FlowLog", "all_addons", "install"]


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


def install(master, operator: list | tuple = ()) -> list:
    """Add `all_addons(operator)` to `master` (before it runs) and move SecretDns and
    DnsFilter ahead of mitmproxy's DNS resolver. Returns the addons."""
    addons = all_addons(operator)
    master.addons.add(GcFreeze(), *addons)
    firsts = [a for a in addons if isinstance(a, (SecretDns, DnsFilter))]
    resolver = master.addons.get("dnsresolver")
    chain = master.addons.chain
    if resolver in chain and any(chain.index(resolver) < chain.index(a) for a in firsts):
        # Rebind rather than mutate: an event being dispatched keeps iterating the old list.
        reordered = [a for a in chain if a not in firsts]
        at = reordered.index(resolver)
        reordered[at:at] = firsts
        master.addons.chain = reordered
    return addons
