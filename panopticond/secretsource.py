"""Secret values: read at start, handed to the proxy alone, and placeholders for the agent.

The daemon (root) reads each configured secret (`secretconfig.SecretSpec`) from its
source: a file owned by root and readable by root only, a variable of the daemon's own
environment, or a systemd credential in $CREDENTIALS_DIRECTORY. Anything else is a
`ConfigError` that names the file, line and key of the secret and how to fix it; no
message ever holds a value.

The values reach the proxy in one JSON file in the instance's runtime directory, owned
by the proxy user and readable by it alone (`write_for_proxy`): never argv, never the
proxy's environment, never a log. The agent gets only placeholders, under each
secret's `env_name` (`agent_env`). A "random" placeholder is drawn here, once per start.

The file's schema (`proxy_doc`, read back strictly by `parse_doc`):

    {"version": 1, "dlp": "block" | "log", "dlp_patterns": [[name, regex], ...],
     "secrets": [{"name", "domains": [...], "placeholder", "value", "headers_only",
                  "allow_plaintext", "on_tripwire", "exclusive"}, ...]}
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets as _random
import stat
import string
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from panopticond.errors import ConfigError
from panopticond.secretconfig import DLP_MODES, ON_TRIPWIRE, RANDOM, SecretSpec

DOC_VERSION = 1
FILE_NAME = "secrets.json"
MIN_LENGTH = 8  # a shorter value would be found (and redacted) all over the place
MAX_LENGTH = 16384
RANDOM_MIN = 24
_ALNUM = string.ascii_letters + string.digits


@dataclasses.dataclass(frozen=True)
class Loaded:
    spec: SecretSpec
    value: str = dataclasses.field(repr=False)
    placeholder: str

    def __repr__(self) -> str:
        return f"Loaded({self.spec.name!r}, placeholder={self.placeholder!r})"


def load(specs: Sequence[SecretSpec], environ: Mapping[str, str] | None = None, *,
         owner_uid: int = 0) -> list[Loaded]:
    """Read every secret's value and fix its placeholder; ConfigError on the first problem.

    `owner_uid`: who must own a secret file (root; tests pass their own uid)."""
    env = os.environ if environ is None else environ
    out = []
    for spec in specs:
        value = _check_value(spec, read_value(spec, env, owner_uid))
        placeholder = spec.placeholder
        if placeholder == RANDOM:
            # As long as the value where possible, so that a streamed body whose value is
            # swapped keeps its length.
            placeholder = "pnt" + "".join(_random.choice(_ALNUM)
                                          for _ in range(max(len(value), RANDOM_MIN) - 3))
        out.append(Loaded(spec, value, placeholder))
    _check_apart(out)
    return out


def read_value(spec: SecretSpec, environ: Mapping[str, str], owner_uid: int = 0) -> str:
    if spec.source == "env":
        if spec.ref not in environ:
            _fail(spec, "env", f"the daemon's environment has no variable {spec.ref}",
                  f"set {spec.ref} in the daemon's environment (for systemd: an "
                  "EnvironmentFile= readable by root only), or use file = or credential =")
        return environ[spec.ref]
    if spec.source == "credential":
        directory = environ.get("CREDENTIALS_DIRECTORY", "")
        if not directory:
            _fail(spec, "credential", "$CREDENTIALS_DIRECTORY is not set: not started by "
                  "systemd with credentials",
                  f"add LoadCredential={spec.ref}:/path/to/secret to the unit "
                  "(or use file = outside systemd)")
        path = os.path.join(directory, spec.ref)
    else:
        path = spec.ref
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        _fail(spec, spec.source, f"cannot read {path}: {e.strerror or e}",
              f"create it (umask 077; printf %s VALUE > {path}), owned by root, mode 0600"
              if isinstance(e, FileNotFoundError) else "run as root; check the path")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            _fail(spec, spec.source, f"{path} is not a regular file",
                  "put the value in a plain file")
        if st.st_uid != owner_uid or st.st_mode & 0o077:
            who = "owned by another user" if st.st_uid != owner_uid else \
                f"readable or writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
            _fail(spec, spec.source, f"{path} is {who}: the agent's user may read it",
                  f"chown root:root {path} && chmod 600 {path}")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = f.read(MAX_LENGTH + 2)
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        _fail(spec, spec.source, f"{path} is not text (UTF-8)", "store the value as text")


def _check_value(spec: SecretSpec, raw: str) -> str:
    where = spec.source
    value = raw.strip()  # a trailing newline is what `echo > file` leaves
    if not value:
        _fail(spec, where, "the secret's value is empty",
              "put the value in it (without anything else)")
    if len(value) > MAX_LENGTH:
        _fail(spec, where, f"the secret's value is longer than {MAX_LENGTH} bytes",
              "a secret is a key or token, not a document")
    if len(value) < MIN_LENGTH:
        _fail(spec, where, f"the secret's value is shorter than {MIN_LENGTH} characters: it "
              "would be found (and replaced) in unrelated data", "use the real credential")
    if any(not 0x20 <= ord(c) < 0x7F for c in value):
        _fail(spec, where, "the secret's value holds a character that is not printable "
              "ASCII (a line break?)", "a secret goes into HTTP headers: printable ASCII only")
    if spec.placeholder != RANDOM and (spec.placeholder in value or value in spec.placeholder):
        _fail(spec, "placeholder", "the placeholder and the real value contain one another",
              "choose another placeholder")
    return value


def _check_apart(loaded: Sequence[Loaded]) -> None:
    for a in loaded:
        for b in loaded:
            if a is not b and (a.placeholder in b.value or b.value in a.placeholder):
                _fail(a.spec, "placeholder", f"the placeholder of {a.spec.name} and the real "
                      f"value of {b.spec.name} contain one another",
                      f"choose another placeholder for {a.spec.name}")


def _fail(spec: SecretSpec, field: str, message: str, hint: str) -> NoReturn:
    raise ConfigError(f"secret {spec.name}: {message}", file=spec.file, line=spec.line,
                      key=f"{spec.key}.{field}" if spec.key else None, hint=hint)


def agent_env(loaded: Sequence[Loaded]) -> dict[str, str]:
    """The agent's variables: each placeholder under its env_name."""
    return {s.spec.env_name: s.placeholder for s in loaded}


def proxy_doc(loaded: Sequence[Loaded], dlp: str = "block",
              dlp_patterns: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    return {
        "version": DOC_VERSION,
        "dlp": dlp,
        "dlp_patterns": [list(p) for p in dlp_patterns],
        "secrets": [{
            "name": s.spec.name, "domains": list(s.spec.domains), "placeholder": s.placeholder,
            "value": s.value, "headers_only": s.spec.headers_only,
            "allow_plaintext": s.spec.allow_plaintext, "on_tripwire": s.spec.on_tripwire,
            "exclusive": s.spec.exclusive,
        } for s in loaded],
    }


def parse_doc(doc: Any) -> dict[str, Any]:
    """`doc` checked against the schema above (ValueError otherwise, naming no value)."""
    if not isinstance(doc, dict) or doc.get("version") != DOC_VERSION:
        raise ValueError("not a panopticon secrets file of a known version")
    if set(doc) - {"version", "dlp", "dlp_patterns", "secrets"}:
        raise ValueError(f"unknown keys {sorted(set(doc) - {'version', 'dlp', 'dlp_patterns', 'secrets'})}")
    if doc.get("dlp", "block") not in DLP_MODES:
        raise ValueError("'dlp' must be block or log")
    pats = doc.get("dlp_patterns", [])
    if not isinstance(pats, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in pats):
        raise ValueError("'dlp_patterns' must be a list of [name, regex]")
    items = doc.get("secrets", [])
    if not isinstance(items, list):
        raise ValueError("'secrets' must be a list")
    keys = {"name", "domains", "placeholder", "value", "headers_only", "allow_plaintext",
            "on_tripwire", "exclusive"}
    for i, s in enumerate(items):
        if not isinstance(s, dict) or set(s) != keys:
            raise ValueError(f"secret #{i} does not have exactly the keys {sorted(keys)}")
        for k in ("name", "placeholder", "value"):
            if not isinstance(s[k], str) or not s[k]:
                raise ValueError(f"secret #{i}: {k!r} must be a non-empty string")
        if not isinstance(s["domains"], list) or not s["domains"] or \
                not all(isinstance(d, str) for d in s["domains"]):
            raise ValueError(f"secret {s['name']}: 'domains' must be a list of host patterns")
        for k in ("headers_only", "allow_plaintext", "exclusive"):
            if not isinstance(s[k], bool):
                raise ValueError(f"secret {s['name']}: {k!r} must be true or false")
        if s["on_tripwire"] not in ON_TRIPWIRE:
            raise ValueError(f"secret {s['name']}: unknown on_tripwire")
    return {"dlp": doc.get("dlp", "block"), "dlp_patterns": [tuple(p) for p in pats],
            "secrets": items}


def write_for_proxy(path: str, doc: dict[str, Any], uid: int, gid: int) -> None:
    """Write `doc` to `path`, readable and writable by `uid` alone; replaced by rename,
    so the proxy never reads a half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            fd = -1
            json.dump(doc, f)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
