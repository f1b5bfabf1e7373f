"""Which wildcard host patterns are too broad to allow: public suffixes and platforms.

Pure: reads data files only. `*.example.com` is a fine rule: example.com's owner controls
every name under it. `*.com`, `*.co.uk` or `*.github.io` are not: anyone can register a
name (or host a site) under a public suffix, so such a wildcard allows the whole internet,
or every user of a hosting platform, which is an exfiltration path (threats 15, 30).

The Public Suffix List decides, ICANN and private sections both: the copy that ships with
mitmproxy (its `publicsuffix2` dependency), united with the system's
(/usr/share/publicsuffix, Debian's `publicsuffix` package) when there is one: the union
only ever refuses more. A wildcard is refused when its base
- is a public suffix itself (`*.com`, `*.github.io`; an unknown TLD such as `example`
  counts as one, as the list's default rule says), or
- has a public suffix under it (`*.amazonaws.com` covers `s3.amazonaws.com`), or
- is, or is above, a platform in `MULTI_TENANT`: hosting and tunnelling services and
  out-of-band interaction services whose subdomains belong to anyone, some of which
  the list does not (or did not yet) carry.

Without any list to read, every wildcard is refused (fail closed), saying why.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import idna

SYSTEM_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"

# Subdomains of these belong to different people. Kept short: the list covers most.
MULTI_TENANT = frozenset({
    # cloud hosting and storage
    "amazonaws.com", "on.aws", "cloudfront.net", "elasticbeanstalk.com", "awsapprunner.com",
    "azurewebsites.net", "azureedge.net", "azurefd.net", "azurestaticapps.net",
    "cloudapp.net", "cloudapp.azure.com", "core.windows.net", "trafficmanager.net",
    "appspot.com", "cloudfunctions.net", "run.app", "web.app", "firebaseapp.com",
    "firebaseio.com", "googleusercontent.com", "storage.googleapis.com",
    "digitaloceanspaces.com", "ondigitalocean.app", "oraclecloud.com", "supabase.co",
    # site and app hosting
    "github.io", "githubusercontent.com", "gitlab.io", "bitbucket.io", "herokuapp.com",
    "netlify.app", "vercel.app", "now.sh", "pages.dev", "workers.dev", "r2.dev",
    "fly.dev", "onrender.com", "railway.app", "glitch.me", "repl.co", "replit.dev",
    "surge.sh", "neocities.org", "readthedocs.io", "webflow.io", "wixsite.com",
    "blogspot.com", "wordpress.com", "tumblr.com", "deno.dev",
    # tunnels and dynamic DNS
    "ngrok.io", "ngrok.app", "ngrok-free.app", "ngrok.dev", "trycloudflare.com", "loca.lt",
    "serveo.net", "localhost.run", "duckdns.org", "no-ip.org", "ddns.net", "hopto.org",
    # out-of-band interaction (DNS and HTTP canaries): made for exfiltration
    "oastify.com", "burpcollaborator.net", "interact.sh", "oast.fun", "oast.live",
    "oast.me", "oast.online", "oast.pro", "oast.site", "dnslog.cn", "ceye.io",
    "requestbin.net", "pipedream.net", "canarytokens.com",
})

HINT = ("allow the exact names the agent needs (e.g. 'api.example.com'), or a wildcard "
        "over a domain someone owns as a whole (e.g. '*.example.com')")


class _Rules:
    """The parsed list: normal rules, the parents of wildcard rules, exceptions, and every
    name that has a rule below it."""

    def __init__(self, texts: list[str]):
        self.normal: set[str] = set()
        self.wild: set[str] = set()  # "x.y" for the rule "*.x.y"
        self.exceptions: set[str] = set()
        self.above: dict[str, str] = {}  # name -> one public suffix strictly under it
        # The lists overlap almost wholly: each rule once, in the order first seen (so
        # `above` keeps the same example). Half the work on every config load.
        for rule in dict.fromkeys(line.strip().split(" ", 1)[0]
                                  for text in texts for line in text.splitlines()):
            if not rule or rule.startswith("//"):
                continue
            kind = self.normal
            if rule.startswith("!"):
                rule, kind = rule[1:], self.exceptions
            elif rule.startswith("*."):
                rule, kind = rule[2:], self.wild
            name = _ascii(rule)
            if name is None:
                continue
            kind.add(name)
            if kind is self.exceptions:
                continue
            example = name if kind is self.normal else "*." + name
            labels = name.split(".")
            start = 1 if kind is self.normal else 0
            for i in range(start, len(labels)):
                parent = ".".join(labels[i:])
                if parent != example:
                    self.above.setdefault(parent, example)

    def is_suffix(self, name: str) -> bool:
        if name in self.exceptions:
            return False
        if name in self.normal or "." not in name:
            return True
        return name.split(".", 1)[1] in self.wild

    def public_suffix(self, name: str) -> str:
        labels = name.split(".")
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if self.is_suffix(candidate):
                return candidate
        return labels[-1]


def _ascii(rule: str) -> str | None:
    try:
        return rule.lower() if rule.isascii() else idna.encode(rule, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None


def _list_files() -> list[str]:
    files = []
    spec = importlib.util.find_spec("publicsuffix2")
    if spec is not None and spec.origin:
        files.append(os.path.join(os.path.dirname(spec.origin), "public_suffix_list.dat"))
    files.append(SYSTEM_LIST)
    return files


@functools.lru_cache(maxsize=1)
def _rules() -> _Rules | None:
    texts = []
    for path in _list_files():
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except OSError:
            continue
    return _Rules(texts) if texts else None


def wildcard_problem(base: str) -> str | None:
    """Why `*.<base>` is too broad to allow, or None. `base` is canonical (policy.py)."""
    shown = f"'*.{base}'"
    rules = _rules()
    if rules is None:
        return (f"{shown} cannot be checked: the public suffix list is missing "
                f"(publicsuffix2, {SYSTEM_LIST})")
    if rules.is_suffix(base):
        return (f"{shown} covers every name under the public suffix {base}, which anyone "
                "can register")
    if base in rules.above:
        return (f"{shown} covers the public suffix {rules.above[base]}, where anyone can "
                "register a name")
    labels = base.split(".")
    for i in range(len(labels)):
        if ".".join(labels[i:]) in MULTI_TENANT:
            if i == 0:
                return f"{shown} covers {base}, a platform where anyone can host a name"
            return None  # a wildcard under one tenant of a platform is that tenant's
    under = sorted(p for p in MULTI_TENANT if p.endswith("." + base))
    if under:
        return f"{shown} covers {under[0]}, a platform where anyone can host a name"
    return None


def registrable_domain(name: str) -> str:
    """The public suffix of canonical `name` plus one label (`a.b.example.co.uk` ->
    `example.co.uk`); `name` itself if it is a suffix. Without a list: the last two labels."""
    rules = _rules()
    labels = name.split(".")
    if rules is None:
        return ".".join(labels[-2:])
    suffix = rules.public_suffix(name)
    n = len(suffix.split("."))
    return ".".join(labels[-(n + 1):]) if len(labels) > n else name
