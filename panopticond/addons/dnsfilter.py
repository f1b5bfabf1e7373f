"""DnsFilter: answer DNS for allowed names only, and nothing but A and AAAA.

mitmproxy's DNS mode resolves A/AAAA itself and forwards every other query type to
the upstream resolver unchanged; either way a name reaches the outside, which is a
channel out of the jail. So, in `dns_request`:

- A/AAAA for an allowed name: marked allowed, left to mitmproxy's resolver;
- A/AAAA for any other name: NXDOMAIN, answered here;
- every other type, class, opcode or a multi-question message: REFUSED (NOTIMP for
  opcodes other than QUERY), answered here. This includes HTTPS and SVCB records, so
  the agent never learns an ECH configuration from the jail's DNS (threat 16): failing
  closed costs clients only the HTTPS-record shortcut, never a connection.

The addresses an allowed answer carries are checked and pinned to the name by
binding.py (`dns_response`).

This only keeps denied names from being looked up if it runs *before* mitmproxy's
own `dnsresolver` addon, which a DumpMaster adds ahead of ours: use
`panopticond.addons.install()`. `running()` logs an error if the order is wrong.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, dns

from panopticond.addons import dispatch, policyfile, verdict
from panopticond.destinations import decide_dns

logger = logging.getLogger(__name__)

BY = "dnsfilter"
ANSWERED_TYPES = (dns.types.A, dns.types.AAAA)


def _refuse_on_error(self, flow: dns.DNSFlow) -> None:
    verdict.answer_dns(flow, dns.response_codes.SERVFAIL, reason="internal error in the proxy",
                       host=None, by=BY)


class DnsFilter:
    name = "panopticon_dnsfilter"

    def __init__(self, policy: policyfile.PolicyFile | None = None):
        self.policy = policy or policyfile.PolicyFile()

    def load(self, loader):
        policyfile.add_option(loader)

    def configure(self, updated):
        if policyfile.OPTION in updated:
            self.policy.load(ctx.options.panopticon_policy)

    def running(self):
        if not self.policy.configured:
            self.policy.load(ctx.options.panopticon_policy)
        chain = dispatch.expand(ctx.master.addons.chain)
        resolver = ctx.master.addons.get("dnsresolver")
        if resolver in chain and self in chain and chain.index(resolver) < chain.index(self):
            logger.error(
                "panopticon: DnsFilter runs after mitmproxy's DNS resolver, so denied names "
                "would be looked up upstream; add the addons with panopticond.addons.install()"
            )

    def dns_request(self, flow: dns.DNSFlow):
        try:
            self._filter(flow)
        except Exception:
            logger.exception("panopticon: dns_request failed; answering SERVFAIL")
            try:
                _refuse_on_error(self, flow)
            except Exception:
                logger.exception("panopticon: could not answer a DNS query after an error")

    def _filter(self, flow: dns.DNSFlow) -> None:
        if flow.error or not flow.live or verdict.get(flow):
            return
        msg = flow.request
        # A response already here is not a decision: it is either the answer to an
        # earlier query that reused this message id (drop it, or it would be sent again
        # for this one), or mitmproxy's resolver ran before us; a denied name gets ours.
        if flow.response is not None and flow.response.questions != msg.questions:
            flow.response = None
        question = msg.questions[0] if len(msg.questions) == 1 else None
        qname = question.name if question else None
        if not msg.query or msg.op_code != dns.op_codes.QUERY:
            verdict.answer_dns(flow, dns.response_codes.NOTIMP,
                               reason="only standard queries are answered", host=qname, by=BY)
        elif question is None:
            verdict.answer_dns(flow, dns.response_codes.REFUSED,
                               reason="exactly one question is answered", host=None, by=BY)
        elif question.class_ != dns.classes.IN or question.type not in ANSWERED_TYPES:
            verdict.answer_dns(
                flow, dns.response_codes.REFUSED, host=qname, by=BY,
                reason=f"{dns.types.to_str(question.type)} queries are not answered",
            )
        else:
            # Names only a passthrough or port rule mentions are resolved too.
            policy = self.policy.current()
            d = decide_dns(policy, question.name) if policy is not None else policyfile.NO_POLICY
            if d.allowed:
                verdict.record(flow, allowed=True, reason=d.reason, host=qname, by=BY, rule=d.rule)
            else:
                verdict.answer_dns(flow, dns.response_codes.NXDOMAIN, reason=d.reason,
                                   host=qname, by=BY, rule=d.rule)
            verdict.note(flow, d)
