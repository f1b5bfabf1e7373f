"""Credential shapes: the data-loss-prevention rules, as data, and their detector.

Pure. The agent holds no credentials of ours (it has placeholders), so a credential
in its traffic is either its own or one it found; either way it should not leave
unnoticed. A `Rule` is a bytes regex with a few post-conditions that keep it precise
(a word boundary, a minimum entropy of the captured value). The built-in rules are
below; an operator adds rules, or switches a built-in one off, in the config
(`[defaults.dlp_patterns]`, `name = "regex"`, `name = ""`), see `rules()`.

Speed matters: a 200 MB upload is scanned as it streams. Each rule is its own regex
that starts with a literal, which CPython's `re` searches for with a fast skip loop;
an alternation or a case-insensitive flag at the start makes a regex ten times
slower, so the case-insensitive "credential field" rule is written in lower case and
run on a lower-cased copy of the data (`lowercase=True`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence

NAME = re.compile(r"[a-z0-9_]{1,64}")
_WORD = re.compile(rb"[A-Za-z0-9_-]")


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    regex: bytes  # the pattern's source
    lowercase: bool = False  # matched against data.lower(): write the regex in lower case
    boundary: bool = False  # no [A-Za-z0-9_-] right before or after the match
    min_entropy: float = 0.0  # Shannon bits per character of group 1 (or of the match)
    builtin: bool = False


_FIELD_VALUE = rb"[\"']?\s{0,4}[:=]\s{0,4}[\"']?(?:bearer\s+)?([a-z0-9+/=_.~-]{20,512})"

BUILTIN: tuple[Rule, ...] = tuple(
    dataclasses.replace(r, builtin=True) for r in (
        Rule("private_key", rb"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"),
        Rule("aws_access_key_id", rb"AKIA[0-9A-Z]{16}", boundary=True),
        Rule("aws_access_key_id", rb"ASIA[0-9A-Z]{16}", boundary=True),
        Rule("gcp_api_key", rb"AIza[0-9A-Za-z_-]{35}", boundary=True),
        Rule("github_token", rb"gh[pousr]_[A-Za-z0-9]{36,255}", boundary=True),
        Rule("github_token", rb"github_pat_[A-Za-z0-9_]{22,255}", boundary=True),
        Rule("gitlab_token", rb"glpat-[A-Za-z0-9_-]{20,64}", boundary=True),
        Rule("slack_token", rb"xox[abposr]-[A-Za-z0-9-]{10,250}", boundary=True),
        Rule("slack_webhook", rb"hooks\.slack\.com/services/T[A-Za-z0-9_]{6,}/[A-Za-z0-9_/]{10,}"),
        Rule("stripe_key", rb"sk_live_[A-Za-z0-9]{20,250}", boundary=True),
        Rule("stripe_key", rb"rk_live_[A-Za-z0-9]{20,250}", boundary=True),
        Rule("anthropic_key", rb"sk-ant-[A-Za-z0-9_-]{32,250}", boundary=True),
        Rule("openai_key", rb"sk-[A-Za-z0-9_-]{32,250}", boundary=True, min_entropy=3.5),
        Rule("jwt", rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
             boundary=True),
        # A high-entropy value right after a key that names a credential, as in
        # {"api_key": "..."}, password=..., X-Api-Key: ...; one regex per keyword, so that
        # each starts with a literal (see the module's docstring).
        *(Rule("credential_field", kw + _FIELD_VALUE, lowercase=True, min_entropy=3.5)
          for kw in (rb"api[_-]?key", rb"secret", rb"token", rb"passw(?:or)?d",
                     rb"access[_-]?key", rb"private[_-]?key", rb"credential")),
    )
)

BUILTIN_NAMES: tuple[str, ...] = tuple(dict.fromkeys(r.name for r in BUILTIN))


def pattern_problem(text: str) -> str | None:
    """Why `text` cannot be an operator's DLP regex, or None if it can."""
    try:
        rx = re.compile(text.encode("utf-8"))
    except re.error as e:
        return f"not a valid regular expression: {e}"
    if rx.search(b"") is not None:
        return "it matches the empty string, so it would match everything"
    return None


def rules(overrides: Iterable[tuple[str, str]] | Mapping[str, str] = ()) -> tuple[Rule, ...]:
    """The built-in rules with the operator's `overrides` applied, in order: a name with
    a regex adds a rule (replacing a built-in one of that name), a name with "" removes
    the built-in rule. Raises ValueError for a bad regex (the config checks it first)."""
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    changed = dict(items)
    out = [r for r in BUILTIN if r.name not in changed]
    for name, text in changed.items():
        if not text:
            continue
        problem = pattern_problem(text)
        if problem:
            raise ValueError(f"DLP pattern {name!r}: {problem}")
        out.append(Rule(name, text.encode("utf-8")))
    return tuple(out)


def entropy(value: bytes) -> float:
    """Shannon entropy in bits per byte."""
    if not value:
        return 0.0
    counts: dict[int, int] = {}
    for b in value:
        counts[b] = counts.get(b, 0) + 1
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


@dataclasses.dataclass(frozen=True)
class Match:
    rule: str
    start: int
    end: int


class Detector:
    """Finds credential shapes in bytes. `ignore`: values whose presence inside a
    match (or a match inside them) makes it no hit, i.e. our own placeholders."""

    def __init__(self, rules: Sequence[Rule], ignore: Iterable[bytes] = ()):
        self.rules = tuple(rules)
        self._compiled = [(r, re.compile(r.regex)) for r in self.rules]
        self._lower = any(r.lowercase for r in self.rules)
        self.ignore = tuple(i for i in ignore if i)

    def scan(self, data: bytes, first_only: bool = False) -> list[Match]:
        """Matches in `data`, ordered by rule; with `first_only`, at most one."""
        out: list[Match] = []
        lowered = data.lower() if self._lower else data
        for rule, rx in self._compiled:
            for m in rx.finditer(lowered if rule.lowercase else data):
                if self._accept(rule, m, data):
                    out.append(Match(rule.name, m.start(), m.end()))
                    if first_only:
                        return out
                    break  # one per rule is enough to name it
        return out

    def _accept(self, rule: Rule, m: re.Match, data: bytes) -> bool:
        start, end = m.start(), m.end()
        if rule.boundary and (
            (start > 0 and _WORD.match(data, start - 1))
            or (end < len(data) and _WORD.match(data, end))
        ):
            return False
        if m.re.groups >= 1 and m.start(1) >= 0:
            vstart, vend = m.start(1), m.end(1)
        else:
            vstart, vend = start, end
        value = data[vstart:vend]  # in its original case, also for lower-cased rules
        if rule.min_entropy and not (
            entropy(value) >= rule.min_entropy and _mixed(value)
        ):
            return False
        matched = data[start:end]
        for ph in self.ignore:
            if ph in matched or value in ph:
                return False
        return True


def _mixed(value: bytes) -> bool:
    """At least two of: lower-case letters, upper-case letters, digits."""
    kinds = (any(97 <= b <= 122 for b in value), any(65 <= b <= 90 for b in value),
             any(48 <= b <= 57 for b in value))
    return sum(kinds) >= 2
