import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from panopticond import suffixes
from panopticond.config import agent_config, loads, policy_of
from panopticond.errors import ConfigError

F = "/etc/panopticon/config.toml"


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, F)
    return info.value


@pytest.mark.parametrize("text, where, says", [
    ("[defaults]\nallow = [\n  'a.example',\n  '*.com',\n]\n", "4: defaults.allow[1]",
     "public suffix com"),
    ("[defaults]\nallow = ['*.co.uk']\n", "2: defaults.allow[0]", "public suffix co.uk"),
    ("[agents.bot]\npassthrough = ['*.github.io']\n", "2: agents.bot.passthrough[0]",
     "public suffix github.io"),
    ("[defaults]\nallow = [{ host = '*.amazonaws.com', port = 22 }]\n",
     "2: defaults.allow[0].host", "covers the public suffix"),
    ("[defaults]\nallow = [{ host = '*.herokuapp.com', methods = ['GET'] }]\n",
     "2: defaults.allow[0].host", "public suffix herokuapp.com"),
    ("[defaults]\nallow = ['*']\n", "2: defaults.allow[0]", "may only stand alone"),
    ("[defaults]\nallow = [{ host = 'git.example', port = 443 }]\n",
     "2: defaults.allow[0].port", "HTTPS is judged request by request"),
    ("[defaults]\nallow = [{ host = 'git.example' , port = '22' }]\n",
     "2: defaults.allow[0].port", "not a port number"),
    ("[defaults]\nallow = [{ port = 22 }]\n", "2: defaults.allow[0]", "no 'host'"),
    ("[defaults]\nallow = [{ host = 'g.example', port = 22, paths = ['/'] }]\n",
     "2: defaults.allow[0].paths", "unknown key 'paths'"),
    ("[defaults]\nallow_cidrs = ['10.0.0.1/8']\n", "2: defaults.allow_cidrs[0]",
     "did you mean '10.0.0.0/8'"),
    ("[agents.bot]\nallow_cidrs = ['127.0.0.0/8']\n", "2: agents.bot.allow_cidrs[0]",
     "proxy's own listeners"),
    ("[defaults]\nallow_cidrs = '10.0.0.0/8'\n", "2: defaults.allow_cidrs", "expected an array"),
])
def test_errors_name_file_line_key_and_reason(text, where, says):
    e = error(text)
    assert str(e).startswith(f"{F}:{where}: "), str(e)
    assert says in str(e)
    assert e.hint or "expected an array" in str(e)


def test_deny_may_be_as_broad_as_it_likes():
    cfg = loads("[defaults]\ndeny = ['*.com', '*.github.io']\n", F)
    assert cfg.defaults.deny == ("*.com", "*.github.io")


def test_an_allowing_wildcard_on_the_command_line_is_checked_too():
    cfg = loads("", F)
    with pytest.raises(ConfigError) as info:
        agent_config(cfg, None, allow=["*.com"])
    assert str(info.value).startswith("--allow: '*.com' covers")
    assert agent_config(cfg, None, deny=["*.com"]).deny == ("*.com",)


def test_agents_add_to_the_defaults_and_the_policy_carries_them():
    cfg = loads(
        "[defaults]\n"
        "allow = ['www.a.example', { host = 'git.example', port = 22 }]\n"
        "allow_cidrs = ['10.99.0.0/24']\n"
        "passthrough = ['*.pinned.example']\n"
        "[agents.bot]\n"
        "allow = [{ host = 'git.example', port = 22 }, { host = 'x.example', port = 2222 }]\n"
        "allow_cidrs = ['198.51.100.7']\n", F)
    bot = cfg.agents["bot"]
    assert bot.allow == ("www.a.example",) and bot.rules == ()
    assert bot.ports == (("git.example", 22), ("x.example", 2222))
    assert bot.allow_cidrs == ("10.99.0.0/24", "198.51.100.7/32")
    assert bot.passthrough == ("*.pinned.example",)
    dest = policy_of(bot).destinations
    assert dest is not None and dest.tcp_ports == (22, 2222)
    assert policy_of(bot).decide("198.51.100.7").allowed
    assert policy_of(loads("", F).defaults).destinations is None


def _suffixes() -> list[str]:
    rules = suffixes._rules()
    return sorted(rules.normal)[::211]


@settings(max_examples=100, deadline=None)
@given(suffix=st.sampled_from(_suffixes()), key=st.sampled_from(["allow", "passthrough"]),
       pad=st.integers(0, 3))
def test_a_wildcard_over_any_public_suffix_is_refused_where_it_is(suffix, key, pad):
    text = "[defaults]\n" + "\n" * pad + f"{key} = ['ok.example', '*.{suffix}']\n"
    e = error(text)
    assert str(e).startswith(f"{F}:{2 + pad}: defaults.{key}[1]: '*.{suffix}' covers")


@settings(max_examples=100, deadline=None)
@given(suffix=st.sampled_from(_suffixes()),
       label=st.from_regex(r"\A[a-z][a-z0-9]{0,8}\Z"))
def test_a_wildcard_one_label_below_a_suffix_is_accepted(suffix, label):
    assume(suffixes.wildcard_problem(f"{label}.{suffix}") is None)
    cfg = loads(f"[defaults]\nallow = ['*.{label}.{suffix}']\n", F)
    assert cfg.defaults.allow == (f"*.{label}.{suffix}",)
