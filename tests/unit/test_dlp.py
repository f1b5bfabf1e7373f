"""Credential shapes: each built-in rule hits its shape, and ordinary data stays quiet."""

import re

import pytest

from panopticond import dlp

KEY = "9fQz7LmX2bVt8KpW4rYh6NcJ3sDg5aEu"  # 32 mixed characters, high entropy


def names(data: bytes, rules=dlp.BUILTIN, ignore=()):
    return [m.rule for m in dlp.Detector(rules, ignore).scan(data)]


@pytest.mark.parametrize("text, rule", [
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIE...", "private_key"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "private_key"),
    ("-----BEGIN PRIVATE KEY-----", "private_key"),
    ("key=AKIAIOSFODNN7EXAMPLE&x", "aws_access_key_id"),
    ("ASIAY34FZKBOKMUTVV7A", "aws_access_key_id"),
    ("key=AIzaSyA-" + "x1Y2z3" * 5 + "a&", "gcp_api_key"),
    ("token ghp_" + KEY + "abcd", "github_token"),
    ("github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "github_token"),
    ("glpat-" + KEY[:20], "gitlab_token"),
    ("xoxb-1234567890-abcdefghij", "slack_token"),
    ("https://hooks.slack.com/services/T0123ABCD/B0123ABCD/" + KEY[:24], "slack_webhook"),
    ("sk_live_" + KEY, "stripe_key"),
    ("sk-ant-api03-" + KEY, "anthropic_key"),
    ("Bearer sk-proj-" + KEY, "openai_key"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "jwt"),
    ('{"api_key": "' + KEY + '"}', "credential_field"),
    ("PASSWORD=" + KEY, "credential_field"),
    ("X-Auth-Token: " + KEY, "credential_field"),
    ("client_secret: '" + KEY + "'", "credential_field"),
])
def test_each_builtin_rule_hits_its_shape(text, rule):
    assert rule in names(text.encode()), names(text.encode())


@pytest.mark.parametrize("text", [
    "task-management-service-version-two-alpha-rc",  # "sk-" inside a word
    "AKIAIOSFODNN7EXAMPLEX",  # longer than an access key id: not one
    '{"max_tokens": 1000, "token": "short"}',
    '{"password": "aaaaaaaaaaaaaaaaaaaaaaaaaaaa"}',  # no entropy
    '{"secret": "this-is-all-lowercase-words"}',  # one character class
    "eyJhbGciOiJIUzI1NiJ9 is half a JWT",
    "<html><body>" + "lorem ipsum dolor sit amet " * 40 + "</body></html>",
])
def test_ordinary_data_is_not_a_credential(text):
    assert names(text.encode()) == []


def test_placeholders_are_ignored():
    ph = b"PLACEHOLDER_SECRET_VALUE_OPENAI"
    assert names(b'{"api_key": "' + ph + b'"}', ignore=[ph]) == []
    random_ph = b"pnt" + KEY.encode()
    assert names(b"api_key=" + random_ph, ignore=[random_ph]) == []
    assert names(b"api_key=" + random_ph) == ["credential_field"]


def test_operator_rules_add_and_remove():
    rules = dlp.rules({"internal": "itk_[A-Za-z0-9]{12}", "jwt": "", "aws_access_key_id": ""})
    got = {r.name for r in rules}
    assert "internal" in got and "jwt" not in got and "aws_access_key_id" not in got
    assert names(b"x itk_abcdef123456 y", rules) == ["internal"]
    assert names(b"AKIAIOSFODNN7EXAMPLE", rules) == []
    with pytest.raises(ValueError, match="bad"):
        dlp.rules({"bad": "("})


@pytest.mark.parametrize("text, problem", [("(", "not a valid"), ("a*", "empty string"),
                                           ("ok_[0-9]+", None)])
def test_pattern_problem(text, problem):
    got = dlp.pattern_problem(text)
    assert (got is None) if problem is None else (problem in got)


def test_first_only_and_builtin_names():
    d = dlp.Detector(dlp.BUILTIN)
    data = b"AKIAIOSFODNN7EXAMPLE -----BEGIN PRIVATE KEY-----"
    assert len(d.scan(data, first_only=True)) == 1 and len(d.scan(data)) == 2
    assert set(dlp.BUILTIN_NAMES) >= {"private_key", "jwt", "credential_field", "openai_key"}
    assert all(re.fullmatch(dlp.NAME, n) for n in dlp.BUILTIN_NAMES)


def test_entropy():
    assert dlp.entropy(b"") == 0.0 and dlp.entropy(b"aaaa") == 0.0
    assert dlp.entropy(KEY.encode()) > 4.0
