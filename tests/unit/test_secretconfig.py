"""[.. .secrets.NAME], dlp and dlp_patterns in the config: validated, merged, located."""

import pytest

from panopticond import config
from panopticond.errors import ConfigError

F = "/etc/panopticon/config.toml"


def load(text):
    return config.loads(text, F)


def error(text) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load(text)
    return e.value


BASE = '''
[defaults.secrets.OPENAI]
domains = ["api.openai.com"]
file = "/etc/panopticon/secrets/openai"
env_name = "OPENAI_API_KEY"
'''


def test_defaults_apply_to_every_agent_and_an_agent_replaces_by_name():
    cfg = load(BASE + '''
[agents.a]
[agents.b]
dlp = "log"
[agents.b.secrets.OPENAI]
domains = ["*.openai.com"]
env = "KEY"
placeholder = "random"
on_tripwire = "kill"
[agents.b.secrets.GH]
domains = ["api.github.com"]
credential = "gh"
headers_only = true
allow_plaintext = true
exclusive = true
[agents.b.dlp_patterns]
jwt = ""
mine = "itk_[a-z]{8}"
''')
    (a,) = cfg.agents["a"].secrets
    assert (a.name, a.domains, a.source, a.ref, a.placeholder, a.env_name) == (
        "OPENAI", ("api.openai.com",), "file", "/etc/panopticon/secrets/openai",
        "PLACEHOLDER_SECRET_VALUE_OPENAI", "OPENAI_API_KEY")
    assert (a.file, a.line, a.key) == (F, 2, "defaults.secrets.OPENAI")
    assert cfg.defaults.secrets == cfg.agents["a"].secrets
    b = {s.name: s for s in cfg.agents["b"].secrets}
    assert (b["OPENAI"].source, b["OPENAI"].placeholder, b["OPENAI"].on_tripwire,
            b["OPENAI"].env_name) == ("env", "random", "kill", "OPENAI")
    assert b["GH"].headers_only and b["GH"].allow_plaintext and b["GH"].source == "credential"
    assert b["GH"].exclusive and not b["OPENAI"].exclusive and not a.exclusive
    assert cfg.agents["b"].dlp == "log" and cfg.agents["a"].dlp == "block"
    assert dict(cfg.agents["b"].dlp_patterns) == {"jwt": "", "mine": "itk_[a-z]{8}"}
    # Sources are named, values never read.
    doc = config.to_dict(cfg)["agents"]["b"]["secrets"]["GH"]
    assert doc["credential"] == "gh" and "value" not in doc


@pytest.mark.parametrize("body, key, line, words", [
    ('[defaults.secrets.X]\nfile = "/x"\n', "defaults.secrets.X", 1, "no 'domains'"),
    ('[defaults.secrets.X]\ndomains = []\nfile = "/x"\n', "defaults.secrets.X.domains", 2,
     "empty"),
    ('[defaults.secrets.X]\ndomains = ["*.*.com"]\nfile = "/x"\n',
     "defaults.secrets.X.domains[0]", 2, "*"),
    ('[defaults.secrets.X]\ndomains = ["a.com"]\n', "defaults.secrets.X", 1, "no source"),
    ('[defaults.secrets.X]\ndomains = ["a.com"]\nfile = "/x"\nenv = "Y"\n',
     "defaults.secrets.X", 1, "2 sources"),
    ('[defaults.secrets.X]\ndomains = ["a.com"]\nfile = "rel/x"\n',
     "defaults.secrets.X.file", 3, "absolute"),
    ('[defaults.secrets.X]\ndomains = ["a.com"]\nenv = "A B"\n', "defaults.secrets.X.env", 3,
     "variable"),
    ('[defaults.secrets.X]\ndomains = ["a.com"]\ncredential = "../x"\n',
     "defaults.secrets.X.credential", 3, "credential"),
    ('[defaults.secrets.X]\ndomains = ["a.com"]\nfile = "/x"\nplaceholder = "short"\n',
     "defaults.secrets.X.placeholder", 4, "placeholder"),
    ('[defaults.secrets.X]\ndomains = ["a.com"]\nfile = "/x"\nenv_name = "PATH"\n',
     "defaults.secrets.X.env_name", 4, "set by panopticon"),
    ('[defaults.secrets.X]\ndomains = ["a.com"]\nfile = "/x"\non_tripwire = "explode"\n',
     "defaults.secrets.X.on_tripwire", 4, "unknown action"),
    ('[defaults.secrets.X]\ndomains = ["a.com"]\nfile = "/x"\nheaders_only = "yes"\n',
     "defaults.secrets.X.headers_only", 4, "true or false"),
    ('[defaults.secrets.X]\ndomains = ["a.com"]\nfile = "/x"\nexclusive = 1\n',
     "defaults.secrets.X.exclusive", 4, "true or false"),
    ('[defaults.secrets.X]\ndomains = ["a.com"]\nfile = "/x"\nvalue = "sk-123"\n',
     "defaults.secrets.X.value", 4, "unknown key"),
    ('[defaults.secrets."bad name"]\ndomains = ["a.com"]\nfile = "/x"\n',
     'defaults.secrets."bad name"', 1, "invalid secret name"),
    ('[defaults]\ndlp = "maybe"\n', "defaults.dlp", 2, "unknown DLP mode"),
    ('[defaults.dlp_patterns]\nx = "("\n', "defaults.dlp_patterns.x", 2, "regular expression"),
    ('[defaults.dlp_patterns]\nx = ".*"\n', "defaults.dlp_patterns.x", 2, "empty string"),
    ('[defaults.dlp_patterns]\nnope = ""\n', "defaults.dlp_patterns.nope", 2, "no built-in"),
    ('[defaults.dlp_patterns]\nBad = "x"\n', "defaults.dlp_patterns.Bad", 2, "invalid DLP"),
])
def test_errors_name_file_line_and_key(body, key, line, words):
    e = error(body)
    assert (e.file, e.line, e.key) == (F, line, key), str(e)
    assert words in str(e), str(e)
    assert e.hint or words in ("empty", "*", "unknown key", "true or false", "variable")


def test_secrets_must_be_told_apart():
    e = error(BASE + '''
[defaults.secrets.OTHER]
domains = ["a.com"]
env = "X"
env_name = "OPENAI_API_KEY"
''')
    assert "both set the agent's variable OPENAI_API_KEY" in str(e)
    e = error('''
[defaults.secrets.A]
domains = ["a.com"]
env = "X"
placeholder = "PLACEHOLDER_AAAAAAAAAA"
[agents.x.secrets.B]
domains = ["a.com"]
env = "Y"
placeholder = "PLACEHOLDER_AAAAAAAAAA_LONGER"
''')
    assert "overlap" in str(e) and e.key == "agents.x.secrets.B"
