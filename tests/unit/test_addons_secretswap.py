"""SecretGuard, SecretSwap and SecretDns with the real Enforce and FlowLog, as mitmproxy runs them.

`run()` fires the hooks of one request; `sent` is the request as it leaves the proxy (a
copy taken after the last request hook), and the flow itself is what logs and later
addons see once the request is gone.
"""

import base64
import gzip
import json

import brotli
import pytest
from mitmproxy import dns, http
from mitmproxy.proxy import mode_specs
from mitmproxy.proxy.layers import dns as dns_layer
from mitmproxy.proxy.layers import http as hl
from mitmproxy.test import taddons, tflow, tutils

from panopticond import secretsource
from panopticond.addons import secretswap, verdict
from panopticond.addons.enforce import Enforce
from panopticond.addons.flowlog import FlowLog
from panopticond.policy import Policy
from panopticond.secretconfig import SecretSpec

PH = "PLACEHOLDER_SECRET_VALUE_OPENAI"
REAL = "real/Value+0123456789=abcdefXYZ"
PH_PLAIN = "PLACEHOLDER_SECRET_VALUE_LEGACY"
REAL_PLAIN = "legacy-key-0011223344556677"
PH_HDR = "PLACEHOLDER_SECRET_VALUE_HDRONLY"
REAL_HDR = "hdr-only-key-8899aabbccddeeff"
BOUND, OTHER, LEGACY = "api.bound.example", "other.example", "legacy.example"
DEST = "198.51.100.7"


def spec(name, domains, ph, **kw):
    return SecretSpec(name, tuple(domains), "env", "X", ph, name, **kw)


def write_secrets(path, dlp="block", patterns=(), kill=False, exclusive=False):
    loaded = [
        secretsource.Loaded(spec("OPENAI", [BOUND], PH, on_tripwire="kill" if kill else "deny",
                                 exclusive=exclusive), REAL, PH),
        secretsource.Loaded(spec("LEGACY", [LEGACY], PH_PLAIN, allow_plaintext=True),
                            REAL_PLAIN, PH_PLAIN),
        secretsource.Loaded(spec("HDRONLY", [BOUND], PH_HDR, headers_only=True), REAL_HDR,
                            PH_HDR),
    ]
    path.write_text(json.dumps(secretsource.proxy_doc(loaded, dlp, patterns)))


@pytest.fixture
def paths(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(Policy.build(
        "x", [BOUND, OTHER, LEGACY, "*.dyn.example"], []).to_dict()))
    secrets = tmp_path / "secrets.json"
    write_secrets(secrets)
    return {"policy": policy, "secrets": secrets, "log": tmp_path / "requests.jsonl"}


class Jail:
    def __init__(self, tctx, paths):
        self.tctx, self.paths = tctx, paths
        self.master = tctx.master

    def trigger(self, hook, f):
        self.master.addons.trigger(hook(f))

    def run(self, f, response=None):
        """The request's hooks; then the upstream's `response` (or a 200), unless answered
        locally. Returns the request as sent upstream (None if it was not)."""
        self.trigger(hl.HttpRequestHeadersHook, f)
        if f.response is None and not f.error:
            self.trigger(hl.HttpRequestHook, f)
        if f.error:
            self.trigger(hl.HttpErrorHook, f)
            return None
        sent = None
        if f.response is None:
            sent = f.request.copy()
            f.response = response or tutils.tresp()
        self.trigger(hl.HttpResponseHeadersHook, f)
        if f.error:
            self.trigger(hl.HttpErrorHook, f)
            return sent
        self.trigger(hl.HttpResponseHook, f)
        return sent

    def log(self):
        p = self.paths["log"]
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    def records(self, kind):
        return [r for r in self.log() if r["kind"] == kind]


@pytest.fixture
def jail(paths):
    addons = secretswap.addons()
    guard, swap, sdns = addons
    chain = [Enforce(), guard, sdns, FlowLog(), swap]
    with taddons.context(*chain) as tctx:
        tctx.options.update(panopticon_policy=str(paths["policy"]), panopticon_log=str(
            paths["log"]), panopticon_instance="x", panopticon_secrets=str(paths["secrets"]))
        j = Jail(tctx, paths)
        j.core = guard.core
        yield j
    # Whatever happened, no real value reached the log.
    text = paths["log"].read_text() if paths["log"].exists() else ""
    for value in (REAL, REAL_PLAIN, REAL_HDR):
        assert value not in text


def req(host, path="/", headers=None, content=b"", *, tls=True, method="POST", http_version=None):
    h = http.Headers(host=host, **(headers or {}))
    if content and "content-length" not in h:
        h["content-length"] = str(len(content))
    kw = {"http_version": http_version} if http_version else {}
    f = tflow.tflow(req=tutils.treq(host=DEST, port=443 if tls else 80,
                                    scheme=b"https" if tls else b"http", method=method.encode(),
                                    headers=h, content=content, path=path.encode(), **kw))
    f.client_conn.tls = tls
    f.client_conn.sni = host if tls else None
    return f


def b64(x):
    return base64.b64encode(x.encode() if isinstance(x, str) else x).decode()


# --- the swap ---------------------------------------------------------------------------

def test_header_url_and_body_are_swapped_for_the_bound_host_and_put_back(jail):
    body = json.dumps({"key": PH, "n": 1}).encode()
    f = req(BOUND, f"/v1/{PH}?key={PH}", {"authorization": f"Bearer {PH}",
                                          "content-type": "application/json"}, body)
    sent = jail.run(f)
    assert sent.headers["authorization"] == f"Bearer {REAL}"
    assert sent.path == "/v1/real%2FValue%2B0123456789%3DabcdefXYZ?key=" \
                        "real%2FValue%2B0123456789%3DabcdefXYZ"
    assert json.loads(sent.content) == {"key": REAL, "n": 1}
    assert sent.headers["content-length"] == str(len(sent.raw_content))
    # Once it is gone, the flow holds the agent's request again.
    assert f.request.headers["authorization"] == f"Bearer {PH}" and PH in f.request.path
    assert f.request.content == body
    (rec,) = jail.records("http")
    assert rec["decision"] == "allow" and rec["secrets"] == ["OPENAI"]
    assert not jail.records("tripwire")


@pytest.mark.parametrize("ctype, expect", [
    ("application/x-www-form-urlencoded", "k=real%2FValue%2B0123456789%3DabcdefXYZ"),
    ("text/plain", f"k={REAL}"),
    ("application/json", f"k={REAL}"),
])
def test_the_value_is_escaped_for_where_it_goes(jail, ctype, expect):
    sent = jail.run(req(BOUND, "/", {"content-type": ctype}, f"k={PH}".encode()))
    assert sent.content.decode() == expect


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("br", brotli.compress)])
def test_a_compressed_body_is_swapped_and_sent_decoded(jail, encoding, compress):
    body = f"data {PH} data".encode()
    sent = jail.run(req(BOUND, "/", {"content-encoding": encoding}, compress(body)))
    assert sent.raw_content == f"data {REAL} data".encode()
    assert "content-encoding" not in sent.headers


def test_basic_auth_is_swapped_inside_and_its_echo_comes_back_as_sent(jail):
    token = b64(f"user:{PH}")
    f = req(BOUND, "/", {"authorization": f"Basic {token}"})
    real_token = b64(f"user:{REAL}")
    echo = tutils.tresp(content=json.dumps({"authorization": f"Basic {real_token}"}).encode())
    sent = jail.run(f, echo)
    assert sent.headers["authorization"] == f"Basic {real_token}"
    assert json.loads(f.response.content) == {"authorization": f"Basic {token}"}


def test_headers_only_leaves_url_and_body_alone(jail):
    sent = jail.run(req(BOUND, f"/?k={PH_HDR}", {"x-key": PH_HDR}, f"b={PH_HDR}".encode()))
    assert sent.headers["x-key"] == REAL_HDR
    assert sent.path == f"/?k={PH_HDR}" and sent.content == f"b={PH_HDR}".encode()


def test_plaintext_only_where_allowed(jail):
    f = req(BOUND, "/", {"authorization": f"Bearer {PH}"}, tls=False)
    assert jail.run(f) is None and f.response.status_code == 403
    assert "over HTTPS" in f.response.text
    (t,) = jail.records("tripwire")
    assert t["reason"].endswith("over plain HTTP") and t["host"] == BOUND
    sent = jail.run(req(LEGACY, "/", {"x-key": PH_PLAIN}, tls=False))
    assert sent.headers["x-key"] == REAL_PLAIN


def test_the_host_header_is_never_swapped(jail):
    jail.run(req("a.dyn.example", "/"))  # a control: nothing happens to a plain request
    assert not jail.records("tripwire")


# --- tripwires ---------------------------------------------------------------------------

ENCODED = {
    "plain": PH,
    "base64": b64("x" + PH),
    "base64-2": b64("xy" + PH),
    "base64url": base64.urlsafe_b64encode(b"?>" + PH.encode()).decode(),
    "hex": PH.encode().hex(),
    "HEX": PH.encode().hex().upper(),
    "percent": "".join(f"%{c:02X}" for c in PH.encode()),
}


@pytest.mark.parametrize("where", ["header", "query", "path", "body", "json", "form",
                                   "gzip", "br", "basic"])
@pytest.mark.parametrize("enc", list(ENCODED))
def test_a_placeholder_toward_another_host_is_a_tripwire(jail, where, enc):
    v = ENCODED[enc]
    headers, path, content = {}, "/", b""
    if where == "header":
        headers["x-api-key"] = v
    elif where == "query":
        path = f"/search?q={v}"
    elif where == "path":
        path = f"/files/{v}/x"
    elif where == "body":
        content = f"payload {v} end".encode()
    elif where == "json":
        headers["content-type"] = "application/json"
        content = json.dumps({"k": v}).encode()
    elif where == "form":
        headers["content-type"] = "application/x-www-form-urlencoded"
        content = f"a=1&k={v}".encode()
    elif where == "gzip":
        headers["content-encoding"] = "gzip"
        content = gzip.compress(f"payload {v}".encode())
    elif where == "br":
        headers["content-encoding"] = "br"
        content = brotli.compress(f"payload {v}".encode())
    elif where == "basic":
        headers["authorization"] = "Basic " + b64(f"me:{v}")
    f = req(OTHER, path, headers, content)
    assert jail.run(f) is None, "sent upstream"
    assert f.response.status_code == 403 and "OPENAI" in f.response.text
    (t,) = jail.records("tripwire")
    assert (t["secret"], t["found"], t["host"], t["action"]) == ("OPENAI", "placeholder",
                                                                  OTHER, "deny")
    (rec,) = jail.records("http")
    assert rec["decision"] == "deny" and "tripwire" in rec["reason"]


def test_the_same_request_without_a_placeholder_goes(jail):
    assert jail.run(req(OTHER, "/search?q=hello", {"x-api-key": "nothing"}, b"payload"))
    assert not jail.records("tripwire")


def test_a_placeholder_in_the_name_is_a_tripwire(jail):
    f = req(f"{PH.lower()}.dyn.example", "/")
    assert jail.run(f) is None and f.response.status_code == 403
    assert jail.records("tripwire")[0]["where"] == "host name"


def test_the_real_value_in_agent_traffic_is_a_breach_and_never_logged(jail):
    f = req(OTHER, f"/leak/{REAL}?x={REAL}", {"x-k": REAL}, REAL.encode())
    assert jail.run(f) is None and f.response.status_code == 403
    (t,) = jail.records("tripwire")
    assert t["found"] == "value" and t["reason"].startswith("breach")
    assert REAL not in f.request.path and REAL.encode() not in f.request.raw_content
    # In the name itself: no record names it.
    h = req(f"{REAL_PLAIN}.dyn.example", "/")
    assert jail.run(h) is None and h.response.status_code == 403
    assert REAL_PLAIN not in json.dumps(jail.log())
    # Toward its own host too: the agent must never hold it.
    g = req(BOUND, "/", {"authorization": f"Bearer {REAL}"})
    assert jail.run(g) is None and g.response.status_code == 403


def test_kill_trips_the_whole_jail(jail, paths):
    write_secrets(paths["secrets"], kill=True)
    jail.core.file.load(str(paths["secrets"]))
    f = req(OTHER, "/", {"x": PH})
    jail.run(f)
    (t,) = jail.records("tripwire")
    assert t["action"] == "kill" and jail.core.tripped == "OPENAI"
    g = req(BOUND, "/", {"authorization": f"Bearer {PH}"})
    assert jail.run(g) is None and g.response.status_code == 403
    assert "stopping" in g.response.text


def test_exclusive_refuses_the_agents_own_credentials_on_the_domain(jail, paths):
    write_secrets(paths["secrets"], exclusive=True)
    jail.core.file.load(str(paths["secrets"]))
    for name, value in (("authorization", "Bearer own-token-123"), ("x-api-key", "mine"),
                        ("Api-Key", "mine"), ("x-auth-token", "mine"),
                        ("authorization", "Basic " + b64("me:own-password"))):
        f = req(BOUND, "/", {name: value, "x-other": "not a credential header"})
        assert jail.run(f) is None and f.response.status_code == 403, name
        assert "OPENAI" in f.response.text and value not in f.response.text
    recs = jail.records("http")
    assert len(recs) == 5 and all(r["decision"] == "deny" and "exclusive" in r["reason"]
                                  and "secret OPENAI" in r["reason"] for r in recs)
    assert not [r for r in recs if "own-" in json.dumps(r) or "mine" in json.dumps(r)]
    # Positive controls: the placeholders of secrets bound here (as the swap finds them,
    # Basic too), no credential header, an empty one; another domain is not concerned.
    for headers in ({"authorization": f"Bearer {PH}"}, {"x-api-key": PH_HDR},
                    {"authorization": "Basic " + b64(f"me:{PH}")}, {}, {"x-api-key": ""},
                    {"x-other": "anything"}):
        sent = jail.run(req(BOUND, "/", headers))
        assert sent is not None, headers
    assert jail.run(req(OTHER, "/", {"authorization": "Bearer own-token-123"})) is not None


def test_without_exclusive_the_agents_own_credentials_go(jail):
    assert jail.run(req(BOUND, "/", {"authorization": "Bearer own-token-123"})) is not None


# --- DLP ---------------------------------------------------------------------------------

AWS = "AKIAIOSFODNN7EXAMPLE"


def test_dlp_blocks_credential_shapes_anywhere(jail):
    for f in (req(OTHER, f"/?k={AWS}"), req(OTHER, "/", {"x-token": "ghp_" + "a1B2" * 9}),
              req(BOUND, "/", {}, b"-----BEGIN OPENSSH PRIVATE KEY-----\nabc")):
        assert jail.run(f) is None and f.response.status_code == 403
    assert [r["pattern"] for r in jail.records("dlp")] == ["aws_access_key_id",
                                                          "github_token", "private_key"]
    # A session JWT in a cookie goes back to its site; a placeholder is no credential.
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlF"
    assert jail.run(req(OTHER, "/", {"cookie": f"session={jwt}"}))
    assert jail.run(req(BOUND, "/", {"x-api-key": PH}))


def test_dlp_log_mode_and_operator_patterns(jail, paths):
    write_secrets(paths["secrets"], dlp="log", patterns=[("internal", "itk_[0-9]{6}"),
                                                        ("aws_access_key_id", "")])
    jail.core.file.load(str(paths["secrets"]))
    assert jail.run(req(OTHER, "/", {}, b"id itk_123456 " + AWS.encode()))
    (d,) = jail.records("dlp")
    assert (d["pattern"], d["action"], d["where"]) == ("internal", "log", "body")


# --- what comes back ---------------------------------------------------------------------

def test_reflections_are_redacted_in_headers_and_bodies(jail):
    body = json.dumps({"headers": {"authorization": f"Bearer {REAL}"}, "url": "/?k=" + REAL.replace(
        "/", "%2F").replace("+", "%2B").replace("=", "%3D")}).encode()
    resp = tutils.tresp(content=gzip.compress(body), headers=http.Headers(
        content_encoding="gzip", x_echo=f"key={REAL}", content_length=str(len(body))))
    f = req(BOUND, "/", {"authorization": f"Bearer {PH}"})
    jail.run(f, resp)
    text = f.response.content.decode()
    assert REAL not in text and PH in text and "%2F" not in text.split("url")[1][:6]
    assert f.response.headers["x-echo"] == f"key={PH}"
    assert f.response.headers["content-encoding"] == "gzip"
    assert jail.records("http")[0]["redacted"] is True


def test_a_value_in_a_form_that_cannot_be_redacted_ends_the_response(jail):
    resp = tutils.tresp(content=b"token=" + base64.b64encode(b"u:" + REAL.encode()))
    f = req(OTHER, "/")
    jail.run(f, resp)
    assert f.response.status_code == 502 and REAL.encode() not in f.response.raw_content
    assert jail.records("tripwire")[0]["found"] == "value"


def streamed_response(flow, headers):
    flow.response = tutils.tresp(content=None, headers=http.Headers(**headers))
    flow.response.stream = True
    return flow


def feed(stream, chunks):
    out = [stream(c) for c in [*chunks, b""]]
    assert all(isinstance(x, list) and b"" not in x for x in out)  # b"" would end the body
    return b"".join(b"".join(x) for x in out)


def test_a_streamed_response_is_redacted_however_it_is_cut(jail):
    f = req(BOUND, "/", {"authorization": f"Bearer {PH}"})
    jail.trigger(hl.HttpRequestHeadersHook, f)
    jail.trigger(hl.HttpRequestHook, f)
    streamed_response(f, {"content-length": "1000"})
    jail.trigger(hl.HttpResponseHeadersHook, f)
    resp = f.response
    assert callable(resp.stream) and "content-length" not in resp.headers
    assert resp.headers["transfer-encoding"] == "chunked"
    data = (b"x" * 500 + REAL.encode() + b"y" * 100) * 3
    for cut in (1, 7, 510, 515, 529):
        out = feed(resp.stream, [data[i:i + cut] for i in range(0, len(data), cut)])
        assert out == data.replace(REAL.encode(), PH.encode()), cut
    # A compressed stream goes on decoded.
    g = req(BOUND, "/")
    jail.trigger(hl.HttpRequestHeadersHook, g)
    streamed_response(g, {"content-encoding": "gzip", "transfer-encoding": "chunked"})
    jail.trigger(hl.HttpResponseHeadersHook, g)
    assert "content-encoding" not in g.response.headers
    z = gzip.compress(data)
    assert feed(g.response.stream, [z[i:i + 100] for i in range(0, len(z), 100)]) == \
        data.replace(REAL.encode(), PH.encode())


def test_a_streamed_response_from_another_host_with_a_value_is_cut_before_it(jail):
    f = req(OTHER, "/")
    jail.trigger(hl.HttpRequestHeadersHook, f)
    streamed_response(f, {"content-length": "100000"})
    jail.trigger(hl.HttpResponseHeadersHook, f)
    assert f.response.headers["content-length"] == "100000"  # nothing to swap: kept
    data = b"a" * 1000 + REAL.encode() + b"b" * 1000
    out = b""
    for i in range(0, len(data), 13):
        out += b"".join(f.response.stream(data[i:i + 13]))
    assert REAL[:4].encode() not in out and out == b"a" * len(out)
    assert f.error and verdict.get(f)["decision"] == "deny"


def test_a_streamed_upload_is_swapped_and_scanned_across_chunks(jail):
    f = req(BOUND, "/upload", {"content-length": str(10**7)}, b"")
    f.request.stream = True
    jail.trigger(hl.HttpRequestHeadersHook, f)
    stream = f.request.stream
    assert callable(stream)
    assert f.request.headers["content-length"] == str(10**7)  # same length: kept
    data = b"z" * 70000 + PH.encode() + b"z" * 10
    out = feed(stream, [data[i:i + 4096] for i in range(0, len(data), 4096)])
    assert out == data.replace(PH.encode(), REAL.encode())
    # Another length: no Content-Length, chunked; the agent's headers come back after.
    h = req(LEGACY, "/upload", {"content-length": str(10**7)}, b"")
    h.request.stream = True
    jail.trigger(hl.HttpRequestHeadersHook, h)
    assert "content-length" not in h.request.headers
    assert h.request.headers["transfer-encoding"] == "chunked"
    legacy = b"y" * 5000 + PH_PLAIN.encode()
    assert feed(h.request.stream, [legacy[i:i + 999] for i in range(0, len(legacy), 999)]) == \
        legacy.replace(PH_PLAIN.encode(), REAL_PLAIN.encode())
    h.response = tutils.tresp()
    jail.trigger(hl.HttpResponseHeadersHook, h)
    assert h.request.headers["content-length"] == str(10**7)
    # Toward another host the same upload is cut where the placeholder completes.
    g = req(OTHER, "/upload", {"content-length": str(10**7)}, b"")
    g.request.stream = True
    jail.trigger(hl.HttpRequestHeadersHook, g)
    assert g.request.headers["content-length"] == str(10**7)
    sent = b""
    for i in range(0, len(data), 4096):
        sent += b"".join(g.request.stream(data[i:i + 4096]))
    assert len(sent) < len(data) and g.error
    assert jail.records("tripwire")[0]["host"] == OTHER


def test_an_undecodable_body_is_refused(jail):
    f = req(OTHER, "/", {"content-encoding": "gzip"}, b"not gzip at all")
    assert jail.run(f) is None and f.response.status_code == 403
    g = req(OTHER, "/", {"content-encoding": "compress"}, b"x" * 10)
    g.request.stream = True
    jail.trigger(hl.HttpRequestHeadersHook, g)
    assert g.error or (g.response and g.response.status_code == 415)


# --- DNS, inbound, WebSocket, failure --------------------------------------------------------

def dns_flow(name):
    f = tflow.tdnsflow()
    f.request = dns.Message(timestamp=1.0, id=7, query=True, op_code=0, authoritative_answer=False,
                            truncation=False, recursion_desired=True, recursion_available=False,
                            reserved=0, response_code=0,
                            questions=[dns.Question(name, dns.types.A, dns.classes.IN)],
                            answers=[], authorities=[], additionals=[])
    f.response = None
    return f


@pytest.mark.parametrize("name", [f"{PH}.dyn.example", f"{PH.lower()}.dyn.example",
                                  f"{PH.encode().hex()[:40]}.{PH.encode().hex()[40:]}.dyn.example",
                                  base64.b32encode(PH.encode()).decode().rstrip("=").lower()[:60]
                                  + ".dyn.example"])
def test_a_placeholder_in_a_dns_name_is_a_tripwire(jail, name):
    f = dns_flow(name)
    jail.master.addons.trigger(dns_layer.DnsRequestHook(f))
    assert f.response.response_code == dns.response_codes.NXDOMAIN
    assert jail.records("tripwire")[0]["where"] == "dns"
    ok = dns_flow("fine.dyn.example")
    jail.master.addons.trigger(dns_layer.DnsRequestHook(ok))
    assert ok.response is None and verdict.get(ok) is None  # left to DnsFilter


def test_a_value_in_a_dns_name_is_a_breach_and_scrubbed(jail):
    f = dns_flow(REAL_PLAIN + ".dyn.example")
    jail.master.addons.trigger(dns_layer.DnsRequestHook(f))
    assert f.response.response_code == dns.response_codes.NXDOMAIN
    assert REAL_PLAIN not in f.request.questions[0].name


def inbound_flow(content=b"", headers=None):
    f = req("jail.example", "/", headers, content)
    f.client_conn.proxy_mode = mode_specs.ProxyMode.parse("reverse:http://127.0.0.1:8443@9443")
    return f


def test_inbound_requests_are_redacted_and_the_agents_answers_judged(jail):
    f = inbound_flow(f"hello {REAL}".encode(), {"x-k": REAL})
    verdict.record(f, allowed=True, reason="inbound route web", host=None, by="inbound")
    jail.trigger(hl.HttpRequestHeadersHook, f)
    jail.trigger(hl.HttpRequestHook, f)
    assert f.request.headers["x-k"] == PH and f.request.content == f"hello {PH}".encode()
    f.response = tutils.tresp(content=f"token {PH}".encode())
    jail.trigger(hl.HttpResponseHeadersHook, f)
    jail.trigger(hl.HttpResponseHook, f)
    assert f.response.status_code == 502
    assert jail.records("tripwire")[0]["found"] == "placeholder"


def test_websocket_messages(jail):
    f = tflow.twebsocketflow()
    f.request.host_header = OTHER
    verdict.record(f, allowed=True, reason="ok", host=OTHER, by="enforce")
    f.metadata[secretswap.STATE] = secretswap.FlowState(OTHER, True, frozenset())
    f.websocket.messages.append(tflow.websocket.WebSocketMessage(1, True, f"x {PH}".encode()))
    guard = jail.master.addons.get("panopticon_secretguard")
    guard.websocket_message(f)
    assert f.websocket.messages[-1].dropped
    g = tflow.twebsocketflow()
    g.metadata[secretswap.STATE] = secretswap.FlowState(BOUND, True, frozenset({"OPENAI"}))
    g.websocket.messages.append(tflow.websocket.WebSocketMessage(1, False, f"echo {REAL}".encode()))
    guard.websocket_message(g)
    assert g.websocket.messages[-1].content == f"echo {PH}".encode()


def test_an_unreadable_secrets_file_refuses_everything(jail, paths):
    paths["secrets"].write_text("{not json")
    jail.core.file.load(str(paths["secrets"]))
    f = req(OTHER, "/")
    assert jail.run(f) is None and f.response.status_code == 403
    q = dns_flow("fine.dyn.example")
    jail.master.addons.trigger(dns_layer.DnsRequestHook(q))
    assert q.response.response_code == dns.response_codes.REFUSED


def test_an_exception_refuses_the_request(jail, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("bug")
    monkeypatch.setattr(secretswap.secretscan.Catalog, "request_inspector", broken)
    f = req(OTHER, "/")
    assert jail.run(f) is None and f.response.status_code == 403
