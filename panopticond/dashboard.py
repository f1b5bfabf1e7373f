"""The dashboard at `/` and its JSON API, served by the daemon beside /healthz and /metrics.

One static HTML page with its script and style inline (no build step, nothing fetched
from elsewhere) polls two JSON pages of the same listener:

    /api/summary            the instance's status, counts, blocked hosts with the config
                            entry that would allow each, top hosts, requests over time
    /api/recent?after=N     records numbered above N (the live table), and the newest N

Both read a `metrics.LogView` (the request log, as `panopticon logs` reads it) and the
daemon's report (what /healthz serves). Nothing in them is a secret: records name
secrets and never carry values, and the view keeps only `metrics.RECENT_FIELDS`.
Everything the agent chose (names, paths, reasons) is put in the page as text
(`textContent`), never as markup, and the page's Content-Security-Policy lets only its
own inline script (by hash) run, so a crafted path cannot script the operator's browser.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from .metrics import LogView, prometheus_text
from .server import Page, page

RECENT_LIMIT = 200  # records per /api/recent answer
_SUMMARY_KEYS = ("instance", "status", "ready", "not_ready", "checks", "agent", "proxy",
                 "reload", "ca_sha256", "closed")

_STYLE = """
body{font:14px/1.35 system-ui,sans-serif;margin:0;color:#1d232a;background:#f4f5f7}
header{background:#1d232a;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:baseline}
header h1{font-size:18px;margin:0}
.badge{padding:2px 8px;border-radius:10px;font-weight:600;background:#888}
.ready{background:#1f8a4c}.degraded,.starting{background:#c27c0e}.closed,.stopping{background:#b3261e}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px;padding:14px}
section{background:#fff;border-radius:6px;padding:10px 14px;box-shadow:0 1px 2px #0002;overflow:auto}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:4px 0 8px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:2px 6px;border-bottom:1px solid #eee;white-space:nowrap}
td.wrap{white-space:normal;word-break:break-all}
tr.deny td,tr.none td{color:#b3261e}
code{background:#f0f0f0;padding:0 4px;border-radius:3px}
.muted{color:#777}
#counts span{margin-right:14px}
"""

_SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let after = 0;
function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
}
function fill(tbody, rows, make) {
  tbody.replaceChildren();
  for (const r of rows) { const tr = document.createElement("tr"); make(tr, r); tbody.appendChild(tr); }
}
function what(r) {
  if (r.kind === "http") return (r.method || "") + " " + (r.path || "");
  if (r.kind === "dns") return (r.qtype || "?") + " " + (r.qname || "");
  if (r.kind === "tripwire") return "secret " + (r.secret || "?");
  if (r.port != null) return "port " + r.port;
  return "";
}
async function recent() {
  const res = await fetch("api/recent?after=" + after, {cache: "no-store"});
  const doc = await res.json();
  const tbody = $("recent");
  for (const r of doc.records) {
    const tr = document.createElement("tr");
    const d = r.kind === "tripwire" ? "TRIPWIRE" : (r.decision || "-");
    tr.className = r.kind === "tripwire" ? "deny" : (r.decision || "none");
    tr.dataset.seq = r.seq;
    cell(tr, (r.time || "").replace("T", " ").replace("Z", ""));
    cell(tr, d); cell(tr, r.kind); cell(tr, r.host || r.qname, "wrap");
    cell(tr, what(r), "wrap");
    cell(tr, r.kind === "dns" ? r.rcode : r.status);
    cell(tr, r.duration_ms == null ? "" : r.duration_ms + " ms");
    cell(tr, r.reason, "wrap");
    tbody.insertBefore(tr, tbody.firstChild);
  }
  while (tbody.rows.length > 200) tbody.deleteRow(-1);
  after = doc.next;
  $("seen").textContent = String(doc.next);
}
function chart(series) {
  const svg = $("chart"), W = 600, H = 120, n = series.length || 1;
  const max = Math.max(1, ...series.map((p) => p.allowed + p.blocked));
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const bw = W / n;
  series.forEach((p, i) => {
    const ha = (p.allowed / max) * (H - 14), hb = (p.blocked / max) * (H - 14);
    for (const [h, y, c] of [[ha, H - ha, "#1f8a4c"], [hb, H - ha - hb, "#b3261e"]]) {
      if (h <= 0) continue;
      const r = document.createElementNS(ns, "rect");
      r.setAttribute("x", (i * bw).toFixed(1)); r.setAttribute("width", Math.max(1, bw - 1).toFixed(1));
      r.setAttribute("y", y.toFixed(1)); r.setAttribute("height", h.toFixed(1));
      r.setAttribute("fill", c); svg.appendChild(r);
    }
  });
  const t = document.createElementNS(ns, "text");
  t.setAttribute("x", "2"); t.setAttribute("y", "11"); t.setAttribute("font-size", "11");
  t.textContent = "max " + max + " per " + (series.length > 1 ? series[1].t - series[0].t : 0) + " s";
  svg.appendChild(t);
}
async function summary() {
  const res = await fetch("api/summary", {cache: "no-store"});
  const doc = await res.json();
  const s = doc.status;
  document.title = "panopticon: " + s.instance;
  $("name").textContent = s.instance;
  const b = $("state"); b.textContent = s.status; b.className = "badge " + s.status;
  $("detail").textContent = s.closed ? "closed: " + s.closed :
    (s.not_ready && s.not_ready.length ? "not ready: " + s.not_ready.join(", ") : "all checks hold");
  $("proxy").textContent = "proxy pid " + (s.proxy && s.proxy.pid) + ", restarts " + (s.proxy && s.proxy.restarts);
  const rl = s.reload || {};
  $("reload").textContent = rl.generation ? ("reload #" + rl.generation + " " + (rl.ok ? "applied" : "refused") + " at " + rl.at) : "no reload";
  const c = doc.counts;
  $("counts").replaceChildren(...Object.entries(c).map(([k, v]) => {
    const e = document.createElement("span"); e.textContent = k.replace(/_/g, " ") + ": " + v; return e; }));
  fill($("blocked"), doc.blocked, (tr, h) => {
    cell(tr, h.host, "wrap"); cell(tr, h.count); cell(tr, h.reason, "wrap");
    const td = document.createElement("td"); td.className = "wrap";
    if (h.allow_entry) { const k = document.createElement("code"); k.textContent = h.allow_entry; td.append(k, " in " + doc.allow_where); }
    else td.textContent = "(not an allowlist matter: see why)";
    tr.appendChild(td);
  });
  fill($("top"), doc.top, (tr, h) => { cell(tr, h.host, "wrap"); cell(tr, h.count); cell(tr, h.blocked); });
  chart(doc.series);
}
async function tick() {
  try { await Promise.all([recent(), summary()]); $("err").textContent = ""; }
  catch (e) { $("err").textContent = "cannot reach the daemon: " + e; }
}
tick();
setInterval(tick, 1000);
"""

_BODY = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>panopticon</title><style>{style}</style></head>
<body>
<header><h1>panopticon <span id="name"></span></h1><span id="state" class="badge">…</span>
<span id="detail"></span><span id="proxy" class="muted"></span><span id="reload" class="muted"></span>
<span id="err"></span></header>
<main>
<section class="wide"><h2>Counts since the daemon started</h2><div id="counts"></div>
<svg id="chart" viewBox="0 0 600 120" width="100%" height="120" role="img"
 aria-label="requests over time: allowed green, blocked red"></svg></section>
<section><h2>Blocked hosts</h2><table><thead><tr><th>host</th><th>blocked</th><th>why</th>
<th>to allow</th></tr></thead><tbody id="blocked"></tbody></table></section>
<section><h2>Top hosts</h2><table><thead><tr><th>host</th><th>records</th><th>blocked</th>
</tr></thead><tbody id="top"></tbody></table></section>
<section class="wide"><h2>Recent requests <span class="muted">(records seen: <span id="seen">0</span>)</span></h2>
<table><thead><tr><th>time (UTC)</th><th>decision</th><th>kind</th><th>host</th><th>request</th>
<th>status</th><th>took</th><th>reason</th></tr></thead><tbody id="recent"></tbody></table></section>
</main>
<script>{script}</script>
</body></html>
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


HTML = _BODY.format(style=_STYLE, script=_SCRIPT).encode()
# Only this page's own script and style, and requests to its own origin.
CSP = (f"default-src 'none'; script-src {_sha256(_SCRIPT)}; style-src {_sha256(_STYLE)}; "
       "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


def _json(doc: Any, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(doc).encode() + b"\n"


def _allow_where(hint: str) -> str:
    # config.allow_hint's words ("allow of [agents.X] in the config ...") without the tail.
    return re.sub(r" in the config.*$", "", hint) or "allow"


def summary(view: LogView | None, report: Callable[[], tuple[int, dict]],
            allow_hint: str) -> dict[str, Any]:
    """The document of /api/summary."""
    _, doc = report()
    status = {k: doc[k] for k in _SUMMARY_KEYS if k in doc}
    if view is None:
        return {"status": status, "counts": {}, "blocked": [], "top": [], "series": [],
                "allow_where": _allow_where(allow_hint)}
    t = view.snapshot()
    requests = sum(t.requests.values())
    denied = sum(n for (_, d), n in t.requests.items() if d != "allow")
    counts = {"requests": requests, "blocked": denied,
              "dns_queries": sum(t.dns.values()),
              "dns_refused": sum(n for (d, _), n in t.dns.items() if d != "allow"),
              "tripwires": sum(t.tripwires.values()),
              "bytes_out": t.bytes["out"], "bytes_in": t.bytes["in"]}
    blocked, top = view.hosts_view()
    for b in blocked:
        b["allow_entry"] = json.dumps(b["host"]) if b.pop("allowable") else None
    return {"status": status, "counts": counts, "blocked": blocked, "top": top,
            "series": view.series(), "allow_where": _allow_where(allow_hint)}


def pages(view: Callable[[], LogView | None], report: Callable[[], tuple[int, dict]],
          allow_hint: Callable[[], str]) -> dict[str, Page]:
    """`/`, `/api/summary`, `/api/recent` and `/metrics`; `view()` may be None until the
    daemon has one (the pages then show the status alone)."""

    def index() -> tuple:
        return 200, "text/html; charset=utf-8", HTML, {"Content-Security-Policy": CSP}

    def api_summary() -> tuple:
        return _json(summary(view(), report, allow_hint()))

    def api_recent(query: dict[str, str]) -> tuple:
        try:
            after = int(query.get("after", "0"))
            limit = min(int(query.get("limit", str(RECENT_LIMIT))), RECENT_LIMIT)
        except ValueError:
            return _json({"error": "after and limit are integers"}, 400)
        v = view()
        if v is None:
            return _json({"next": 0, "records": []})
        newest, records = v.recent(after, limit)
        return _json({"next": newest, "records": records})

    def metrics() -> tuple:
        v = view()
        _, doc = report()
        if v is None:
            from .metrics import Totals
            text = prometheus_text(Totals(), doc, started=0.0)
        else:
            text = prometheus_text(v.snapshot(), doc, started=v.started, log_stats=v.stats,
                                   log_status=v.log_status())
        return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()

    return {"/": page(index, browser=True),
            "/api/summary": page(api_summary, browser=True),
            "/api/recent": page(api_recent, query=True, browser=True),
            "/metrics": page(metrics)}
