"""AddHeaders: set the operator's request headers on allowed requests to their hosts.

`headers = { "api.example.com" = { "X-Org" = "acme" } }` in the config becomes
`Policy.headers`; each name is set (replacing whatever the agent sent under that name)
on every request that was allowed, to a host the pattern matches. The host is the
name that was judged (SNI or Host), never the address the agent connected to. Denied
requests get nothing: a header may carry a credential of the operator's.

It runs in `requestheaders`, after Enforce decided: a streamed request's headers go
upstream right after that hook, before `request` runs.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, http

from panopticond.addons import policyfile, verdict

logger = logging.getLogger(__name__)


class AddHeaders:
    name = "panopticon_headers"

    def __init__(self, policy: policyfile.PolicyFile | None = None):
        self.policy = policy or policyfile.PolicyFile()

    def load(self, loader):
        policyfile.add_option(loader)

    def configure(self, updated):
        if policyfile.OPTION in updated:
            self.policy.load(ctx.options.panopticon_policy)

    def requestheaders(self, flow: http.HTTPFlow):
        try:
            if flow.error or not flow.live or flow.response is not None:
                return
            v = verdict.get(flow)
            if v is None or v.get("decision") != "allow" or not v.get("host"):
                return
            policy = self.policy.current()
            if policy is None:
                return
            for name, value in policy.headers_for(v["host"]):
                flow.request.headers[name] = value
        except Exception:
            # A header the operator wants may be what makes the request acceptable
            # upstream (an org id, a tenant): without it, do not send the request.
            logger.exception("panopticon: adding request headers failed; denying")
            verdict.deny_http(flow, 403, "panopticon: request blocked: internal error in "
                              "the proxy.\n", phase="requestheaders",
                              reason="internal error in the proxy", host=None, by="headers")
