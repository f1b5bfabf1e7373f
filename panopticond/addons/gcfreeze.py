"""Keep the proxy's start-up heap out of the garbage collector's way.

Everything loaded before the proxy serves (mitmproxy's module graph, the policy, the
secrets' scanners, the CA) lives for the whole run. Left in the collected generations,
each full collection walks all of it again, on the path of requests. `gc.freeze()` moves
what exists at `running` to the permanent generation; it is still freed by reference
counting, only never scanned for cycles. Nothing else changes: no decision, log record
or limit depends on it.
"""

from __future__ import annotations

import gc


class GcFreeze:
    name = "panopticon_gcfreeze"

    def running(self):
        gc.collect()
        gc.freeze()
