"""panopticon's mitmproxy addons, added to the proxy's master directly (never as `-s`
scripts, whose import failures mitmproxy logs and then runs without).

In order: `Enforce` judges connections and requests and gates upstream connections,
`DnsFilter` answers DNS, `FlowLog` writes one line per flow, `FinalGuard` denies
whatever nobody allowed. Enforce and DnsFilter share one policy file; Enforce and
FinalGuard share the approvals of the `server_connect` gate.

Use `install(master)`: a DumpMaster already holds mitmproxy's own `dnsresolver`,
which would resolve a query before `DnsFilter` sees it; `install` puts DnsFilter
ahead of it. Everything else of ours must run after mitmproxy's addons (Enforce
overrides `next_layer` and `tls_clienthello` choices) and stays at the end.
"""

from __future__ import annotations

from panopticond.addons.dnsfilter import DnsFilter
from panopticond.addons.enforce import Enforce
from panopticond.addons.finalguard import FinalGuard
from panopticond.addons.flowlog import FlowLog
from panopticond.addons.policyfile import PolicyFile
from panopticond.addons.verdict import Approvals

__all__ = ["DnsFilter", "Enforce", "FinalGuard", "FlowLog", "all_addons", "install"]


def all_addons() -> list:
    """Fresh instances of every addon, wired together, in the order they must run."""
    policy = PolicyFile()
    approvals = Approvals()
    return [
        Enforce(policy, approvals),
        DnsFilter(policy),
        FlowLog(),
        FinalGuard(approvals),
    ]


def install(master) -> list:
    """Add `all_addons()` to `master` (before it runs) and move DnsFilter ahead of
    mitmproxy's DNS resolver. Returns the addons."""
    addons = all_addons()
    master.addons.add(*addons)
    dns_filter = next(a for a in addons if isinstance(a, DnsFilter))
    resolver = master.addons.get("dnsresolver")
    chain = master.addons.chain
    if resolver in chain and chain.index(resolver) < chain.index(dns_filter):
        # Rebind rather than mutate: an event being dispatched keeps iterating the old list.
        reordered = [a for a in chain if a is not dns_filter]
        reordered.insert(reordered.index(resolver), dns_filter)
        master.addons.chain = reordered
    return addons
