"""The secrets and DLP part of the config: `[defaults.secrets.NAME]`, `[agents.X.secrets.NAME]`,
`dlp` and `[... .dlp_patterns]`, validated into frozen data. Never a secret's value.

Pure, like config.py, which calls `agent_fields()` with its checker so that every error
names the file, the line and the dotted key. The values are read at start
(`secretsource`), not here: loading a config has no side effects, and `panopticon check`
can say whether a source is usable without ever printing a value.

    [defaults.secrets.OPENAI]          # NAME: a letter, then letters, digits, '_' (64 at most)
    domains = ["api.openai.com"]       # host patterns the real value may be sent to
    file = "/etc/panopticon/secrets/openai"  # exactly one source: file (root's, 0600),
    # env = "OPENAI_API_KEY"           #   the daemon's own environment variable, or
    # credential = "openai"            #   systemd LoadCredential=, in $CREDENTIALS_DIRECTORY
    placeholder = "..."                # 16-256 of [A-Za-z0-9._-], or "random" (fresh per
                                       #   start); default PLACEHOLDER_SECRET_VALUE_<NAME>
    env_name = "OPENAI_API_KEY"        # the agent's variable holding the placeholder (NAME)
    headers_only = false               # swap in headers only, not in the URL or body
    allow_plaintext = false            # also swap over plain HTTP
    on_tripwire = "deny"               # or "kill": a tripwire also ends the agent
    exclusive = false                  # refuse any other credential to these domains

    [defaults]
    dlp = "block"                      # or "log": what a credential shape in a request does
    [defaults.dlp_patterns]            # name = "regex" adds a rule; name = "" switches a
    internal = "itk_[A-Za-z0-9]{32}"   #   built-in one off (see panopticond.dlp)

An agent's secret replaces the defaults' secret of the same name as a whole; its
`dlp` replaces the defaults'; its `dlp_patterns` are merged over the defaults'.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from panopticond import dlp

KEYS = ("secrets", "dlp", "dlp_patterns")
SECRET_KEYS = ("domains", "file", "env", "credential", "placeholder", "env_name",
               "headers_only", "allow_plaintext", "on_tripwire", "exclusive")
SOURCES = ("file", "env", "credential")
DLP_MODES = ("block", "log")
ON_TRIPWIRE = ("deny", "kill")
RANDOM = "random"
DEFAULT_PLACEHOLDER = "PLACEHOLDER_SECRET_VALUE_{}"

SECRET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
PLACEHOLDER = re.compile(r"[A-Za-z0-9._-]{16,256}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
CREDENTIAL = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.:-]{1,255}")
# Variables the agent's environment already sets for its own reasons (agent.py, ca.py).
RESERVED_ENV = frozenset((
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "TZ",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "PIP_CERT", "DENO_CERT", "AWS_CA_BUNDLE",
    "CARGO_HTTP_CAINFO",
))

_SOURCE_HINT = ('give exactly one of: file = "/etc/panopticon/secrets/NAME" (root-owned, '
                'mode 0600), env = "VARIABLE" (in the daemon\'s environment) or '
                'credential = "NAME" (systemd LoadCredential=)')


@dataclasses.dataclass(frozen=True)
class SecretSpec:
    """A configured secret: where its value comes from and where it may go."""

    name: str
    domains: tuple[str, ...]  # canonical host patterns
    source: Literal["file", "env", "credential"]
    ref: str  # the file's path, the variable's or the credential's name
    placeholder: str  # or RANDOM
    env_name: str
    headers_only: bool = False
    allow_plaintext: bool = False
    on_tripwire: Literal["deny", "kill"] = "deny"
    # On its domains, a credential header must carry a placeholder (threat 36).
    exclusive: bool = False
    # Where it is configured, for errors found when its value is read at start.
    file: str = dataclasses.field(default="", compare=False)
    line: int | None = dataclasses.field(default=None, compare=False)
    key: str = dataclasses.field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """For `check --json` and the like: the source is named, the value never read."""
        return {
            "name": self.name, "domains": list(self.domains), "source": self.source,
            self.source: self.ref, "placeholder": self.placeholder, "env_name": self.env_name,
            "headers_only": self.headers_only, "allow_plaintext": self.allow_plaintext,
            "on_tripwire": self.on_tripwire, "exclusive": self.exclusive,
        }


def agent_fields(checker, t: dict[str, Any], p: tuple, base=None) -> dict[str, Any]:
    """The AgentConfig fields of this part for table `t` at path `p`; `base` is the
    defaults' AgentConfig (None while checking [defaults] itself)."""
    inherited = {s.name: s for s in (base.secrets if base is not None else ())}
    own = _secrets(checker, t.get("secrets", {}), (*p, "secrets"))
    merged = {**inherited, **{s.name: s for s in own}}
    secrets = tuple(merged.values())
    _distinct(checker, secrets, (*p, "secrets"))
    mode = base.dlp if base is not None else "block"
    if "dlp" in t:
        mode = checker.string(t["dlp"], (*p, "dlp"))
        if mode not in DLP_MODES:
            checker.fail((*p, "dlp"), f"unknown DLP mode {mode!r}",
                         hint='dlp = "block" (the default) or "log"')
    patterns = dict(base.dlp_patterns) if base is not None else {}
    patterns.update(_patterns(checker, t.get("dlp_patterns", {}), (*p, "dlp_patterns")))
    return {"secrets": secrets, "dlp": mode, "dlp_patterns": tuple(patterns.items())}


def _secrets(checker, raw: Any, path: tuple) -> list[SecretSpec]:
    return [_secret(checker, name, value, (*path, name))
            for name, value in checker.table(raw, path, None).items()]


def _secret(checker, name: str, raw: Any, p: tuple) -> SecretSpec:
    from panopticond.config import dotted_key

    if not SECRET_NAME.fullmatch(name):
        checker.fail(p, f"invalid secret name {name!r}",
                     hint="a secret's name is a letter, then letters, digits and '_' "
                     "(it names the secret in logs: e.g. OPENAI)")
    t = checker.table(raw, p, SECRET_KEYS)
    if "domains" not in t:
        checker.fail(p, "the secret has no 'domains': it could go nowhere",
                     hint='domains = ["api.example.com"]: where its real value may be sent')
    domains = checker.patterns(t["domains"], (*p, "domains"))
    if not domains:
        checker.fail((*p, "domains"), "'domains' is empty: the secret could go nowhere",
                     hint='domains = ["api.example.com"]')
    given = [k for k in SOURCES if k in t]
    if len(given) != 1:
        checker.fail(p, "the secret has no source" if not given
                     else f"the secret has {len(given)} sources ({', '.join(given)})",
                     hint=_SOURCE_HINT)
    source = given[0]
    sp = (*p, source)
    ref = checker.string(t[source], sp)
    if source == "file":
        checker.abspath(ref, sp)
    elif source == "env" and not ENV_NAME.fullmatch(ref):
        checker.fail(sp, f"{ref!r} is not an environment variable name", hint=_SOURCE_HINT)
    elif source == "credential" and not CREDENTIAL.fullmatch(ref):
        checker.fail(sp, f"{ref!r} is not a credential name",
                     hint="the NAME of LoadCredential=NAME:PATH in the unit, without '/'")
    placeholder = DEFAULT_PLACEHOLDER.format(name.upper())
    if "placeholder" in t:
        placeholder = checker.string(t["placeholder"], (*p, "placeholder"))
        if placeholder != RANDOM and not PLACEHOLDER.fullmatch(placeholder):
            checker.fail(
                (*p, "placeholder"), f"{placeholder!r} is not a usable placeholder",
                hint="16-256 characters of A-Z a-z 0-9 . _ - (it must be found again "
                "unambiguously, in headers and URLs as they are), or \"random\"",
            )
    env_name = name
    if "env_name" in t:
        env_name = checker.string(t["env_name"], (*p, "env_name"))
        if not ENV_NAME.fullmatch(env_name):
            checker.fail((*p, "env_name"), f"{env_name!r} is not an environment variable name")
    if env_name in RESERVED_ENV:
        checker.fail((*p, "env_name") if "env_name" in t else p,
                     f"the agent's variable {env_name} is set by panopticon itself",
                     hint="choose another env_name")
    flags = {k: checker.boolean(t[k], (*p, k))
             for k in ("headers_only", "allow_plaintext", "exclusive") if k in t}
    on_tripwire = "deny"
    if "on_tripwire" in t:
        on_tripwire = checker.string(t["on_tripwire"], (*p, "on_tripwire"))
        if on_tripwire not in ON_TRIPWIRE:
            checker.fail((*p, "on_tripwire"), f"unknown action {on_tripwire!r}",
                         hint='on_tripwire = "deny" (the default: 403 and a log record) '
                         'or "kill" (also end the agent)')
    return SecretSpec(
        name=name, domains=domains, source=source, ref=ref,  # type: ignore[arg-type]
        placeholder=placeholder, env_name=env_name, on_tripwire=on_tripwire,  # type: ignore[arg-type]
        file=checker.file, line=checker.line(p), key=dotted_key(p), **flags,
    )


def _distinct(checker, secrets: tuple[SecretSpec, ...], path: tuple) -> None:
    """Placeholders and agent variables must tell the secrets apart."""
    for i, a in enumerate(secrets):
        for b in secrets[:i]:
            where = (*path, a.name)
            if a.env_name == b.env_name:
                checker.fail(where, f"secrets {b.name} and {a.name} both set the agent's "
                             f"variable {a.env_name}", hint="give each its own env_name")
            if RANDOM in (a.placeholder, b.placeholder):
                continue
            if a.placeholder in b.placeholder or b.placeholder in a.placeholder:
                checker.fail(where, f"the placeholders of {b.name} and {a.name} overlap "
                             "(one contains the other): they could not be told apart",
                             hint="give each a placeholder of its own")


def _patterns(checker, raw: Any, path: tuple) -> dict[str, str]:
    out = {}
    for name, value in checker.table(raw, path, None).items():
        p = (*path, name)
        text = checker.string(value, p)
        if not dlp.NAME.fullmatch(name):
            checker.fail(p, f"invalid DLP pattern name {name!r}",
                         hint="1-64 characters of a-z, 0-9 and '_'")
        if not text:
            if name not in dlp.BUILTIN_NAMES:
                checker.fail(p, f"there is no built-in DLP pattern {name!r} to switch off",
                             hint=f"built-in: {', '.join(dlp.BUILTIN_NAMES)}")
        else:
            problem = dlp.pattern_problem(text)
            if problem:
                checker.fail(p, problem, hint="a Python regular expression, matched against "
                             "the raw bytes; starting with a literal keeps it fast")
        out[name] = text
    return out

