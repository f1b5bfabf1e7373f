import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from panopticond import suffixes
from panopticond.suffixes import MULTI_TENANT, registrable_domain, wildcard_problem


@pytest.mark.parametrize("base, says", [
    ("com", "public suffix com"),
    ("co.uk", "public suffix co.uk"),
    ("uk", "public suffix uk"),
    ("github.io", "public suffix github.io"),  # the list's private section
    ("herokuapp.com", "public suffix herokuapp.com"),
    ("example", "public suffix example"),  # an unknown TLD: the list's default rule
    ("ck", "public suffix ck"),  # a wildcard rule, *.ck
    ("x.ck", "public suffix x.ck"),
    ("xn--p1ai", "public suffix xn--p1ai"),  # .рф
    ("amazonaws.com", "covers the public suffix"),  # s3.amazonaws.com is one, under it
    ("compute.amazonaws.com", "covers the public suffix *.compute.amazonaws.com"),
    ("windows.net", "covers core.windows.net, a platform"),
    ("oastify.com", "oastify.com, a platform"),
    ("storage.googleapis.com", "a platform"),
])
def test_too_broad(base, says):
    assert says in (wildcard_problem(base) or "")


@pytest.mark.parametrize("base", [
    "example.com", "allowed.example", "pythonhosted.org", "slack.com", "github.com",
    "anthropic.com", "foo.github.io", "www.ck", "bucket.s3.amazonaws.com",
    "a.oastify.com", "x.storage.googleapis.com", "example.co.uk",
])
def test_owned_domains_are_fine(base):
    assert wildcard_problem(base) is None


def test_without_any_list_every_wildcard_is_refused(monkeypatch):
    monkeypatch.setattr(suffixes, "_list_files", lambda: ["/nonexistent/psl.dat"])
    suffixes._rules.cache_clear()
    try:
        assert "public suffix list is missing" in wildcard_problem("example.com")
    finally:
        monkeypatch.undo()
        suffixes._rules.cache_clear()


def test_registrable_domain():
    assert registrable_domain("a.b.example.co.uk") == "example.co.uk"
    assert registrable_domain("x.y.github.io") == "y.github.io"
    assert registrable_domain("co.uk") == "co.uk"
    assert registrable_domain("q.allowed.example") == "allowed.example"


def _sample_suffixes() -> list[str]:
    rules = suffixes._rules()
    assert rules is not None
    return sorted(rules.normal)[::97]  # ~130 of them, both sections


_LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")


@settings(max_examples=200, deadline=None)
@given(suffix=st.sampled_from(_sample_suffixes()), label=_LABEL)
def test_a_wildcard_at_a_suffix_is_refused_and_one_label_below_is_not(suffix, label):
    assert wildcard_problem(suffix) is not None
    below = f"{label}.{suffix}"
    rules = suffixes._rules()
    assume(not rules.is_suffix(below) and below not in rules.above)
    assume(not any(below == p or below.endswith("." + p) or p.endswith("." + below)
                   for p in MULTI_TENANT))
    assert wildcard_problem(below) is None
