"""Reading secret values at start: sources, permissions, errors that name no value."""

import json
import os
import stat

import pytest

from panopticond import secretsource
from panopticond.errors import ConfigError
from panopticond.secretconfig import SecretSpec

VALUE = "sk-proj-Zq81-real-value-xyz"
ME = os.geteuid()


def spec(source="file", ref="", **kw):
    base = dict(name="OPENAI", domains=("api.openai.com",), source=source, ref=ref,
                placeholder="PLACEHOLDER_SECRET_VALUE_OPENAI", env_name="OPENAI_API_KEY",
                file="/etc/panopticon/config.toml", line=7, key="defaults.secrets.OPENAI")
    base.update(kw)
    return SecretSpec(**base)


def secret_file(tmp_path, text=VALUE + "\n", mode=0o600, name="openai"):
    p = tmp_path / name
    p.write_text(text)
    os.chmod(p, mode)
    return str(p)


def fails(specs, environ=None) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        secretsource.load(specs, environ or {}, owner_uid=ME)
    assert VALUE not in str(e.value) and VALUE not in (e.value.hint or "")
    return e.value


def test_file_env_and_credential_sources(tmp_path):
    f = secret_file(tmp_path)
    creds = tmp_path / "creds"
    creds.mkdir()
    secret_file(creds, name="gh", text="ghp-" + VALUE)
    loaded = secretsource.load(
        [spec("file", f),
         spec("env", "MY_KEY", name="B", env_name="B_KEY", placeholder="PLACEHOLDER_B_0123456"),
         spec("credential", "gh", name="C", env_name="C_KEY", placeholder="random")],
        {"MY_KEY": "  env-" + VALUE + " ", "CREDENTIALS_DIRECTORY": str(creds)}, owner_uid=ME)
    assert [x.value for x in loaded] == [VALUE, "env-" + VALUE, "ghp-" + VALUE]
    assert VALUE not in repr(loaded)
    rand = loaded[2].placeholder
    assert rand.startswith("pnt") and len(rand) == len(loaded[2].value) and rand.isalnum()
    assert secretsource.agent_env(loaded) == {
        "OPENAI_API_KEY": "PLACEHOLDER_SECRET_VALUE_OPENAI", "B_KEY": "PLACEHOLDER_B_0123456",
        "C_KEY": rand}


def test_a_random_placeholder_is_fresh_each_start(tmp_path):
    s = [spec("file", secret_file(tmp_path), placeholder="random")]
    a, b = (secretsource.load(s, {}, owner_uid=ME)[0].placeholder for _ in range(2))
    assert a != b and len(a) >= secretsource.RANDOM_MIN


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_file_others_may_read_or_write_is_refused(tmp_path, mode):
    f = secret_file(tmp_path, mode=mode)
    e = fails([spec("file", f)])
    assert (e.file, e.line, e.key) == ("/etc/panopticon/config.toml", 7,
                                       "defaults.secrets.OPENAI.file")
    assert "others" in str(e) and f"chmod 600 {f}" in e.hint


def test_a_file_of_another_owner_is_refused(tmp_path):
    f = secret_file(tmp_path)
    with pytest.raises(ConfigError, match="owned by another user"):
        secretsource.load([spec("file", f)], {}, owner_uid=ME + 1)


@pytest.mark.parametrize("text, words", [("", "empty"), ("\n  \n", "empty"), ("short", "shorter"),
                                         ("abc\ndef-ghijkl", "printable"),
                                         ("x" * 20000, "longer")])
def test_bad_values(tmp_path, text, words):
    assert words in str(fails([spec("file", secret_file(tmp_path, text=text))]))


def test_missing_sources_say_how_to_fix_them(tmp_path):
    e = fails([spec("file", str(tmp_path / "nope"))])
    assert "No such file" in str(e) and "chmod" not in str(e) and "0600" in e.hint
    e = fails([spec("env", "NOPE")])
    assert e.key == "defaults.secrets.OPENAI.env" and "NOPE" in str(e)
    e = fails([spec("credential", "gh")])
    assert "CREDENTIALS_DIRECTORY" in str(e) and "LoadCredential=gh:" in e.hint
    e = fails([spec("file", str(tmp_path))])
    assert "regular file" in str(e)


def test_placeholder_and_values_must_not_contain_one_another(tmp_path):
    f = secret_file(tmp_path, text="xxPLACEHOLDER_SECRET_VALUE_OPENAIxx")
    assert "contain one another" in str(fails([spec("file", f)]))
    a = spec("file", secret_file(tmp_path, name="a"))
    b = spec("file", secret_file(tmp_path, name="b", text="yy" + a.placeholder + "yy"), name="B",
             env_name="B", placeholder="PLACEHOLDER_BBBBBBBBBB")
    assert "real value of B" in str(fails([a, b]))


def test_the_proxy_document_round_trips_and_is_checked(tmp_path):
    loaded = secretsource.load([spec("file", secret_file(tmp_path), headers_only=True)], {},
                               owner_uid=ME)
    doc = secretsource.proxy_doc(loaded, "log", [("mine", "itk_[0-9]+")])
    parsed = secretsource.parse_doc(json.loads(json.dumps(doc)))
    assert parsed["dlp"] == "log" and parsed["dlp_patterns"] == [("mine", "itk_[0-9]+")]
    (s,) = parsed["secrets"]
    assert s["value"] == VALUE and s["headers_only"] and s["domains"] == ["api.openai.com"]
    for bad in ({}, {"version": 2}, {**doc, "x": 1}, {**doc, "dlp": "maybe"},
                {**doc, "secrets": [{**doc["secrets"][0], "on_tripwire": "boom"}]},
                {**doc, "secrets": [{**doc["secrets"][0], "exclusive": "yes"}]},
                {**doc, "secrets": [{**doc["secrets"][0], "domains": []}]},
                {**doc, "secrets": [{k: v for k, v in doc["secrets"][0].items() if k != "name"}]}):
        with pytest.raises(ValueError) as e:
            secretsource.parse_doc(bad)
        assert VALUE not in str(e.value)


def test_written_for_the_proxy_user_alone(tmp_path):
    path = str(tmp_path / "secrets.json")
    secretsource.write_for_proxy(path, {"version": 1}, ME, os.getegid())
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == ME
    secretsource.write_for_proxy(path, {"version": 1, "n": 2}, ME, os.getegid())
    assert json.loads(open(path).read())["n"] == 2
    assert os.listdir(tmp_path) == ["secrets.json"]
