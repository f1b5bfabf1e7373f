"""Files the proxy runs must be root's alone."""

from __future__ import annotations

import os

import pytest

from panopticond import trusted
from panopticond.errors import PanopticonError

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs files owned by root")


@pytest.fixture
def tree(tmp_path):
    d = tmp_path / "addons"
    d.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    f = d / "a.py"
    f.write_text("x = 1\n")
    os.chmod(f, 0o644)
    return d, f


@root_only
def test_a_root_owned_file_passes(tree):
    _, f = tree
    assert trusted.problem(str(f)) is None
    assert trusted.problem(str(f), reader_gid=12345) is None  # readable by others


@root_only
@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_file_others_can_write_is_refused(tree, mode):
    _, f = tree
    os.chmod(f, mode)
    assert "writable by others" in trusted.problem(str(f))


@root_only
def test_a_directory_others_can_write_is_refused_unless_sticky(tree):
    d, f = tree
    os.chmod(d, 0o777)
    assert "writable by others" in trusted.problem(str(f))
    os.chmod(d, 0o1777)  # like /tmp: others cannot replace root's file in it
    assert trusted.problem(str(f)) is None


@root_only
def test_ownership_and_readability(tree):
    d, f = tree
    os.chown(f, 65534, 0)
    assert "not owned by root" in trusted.problem(str(f))
    os.chown(f, 0, 0)
    os.chmod(f, 0o600)
    assert "not readable by the proxy" in trusted.problem(str(f), reader_gid=12345)
    os.chmod(f, 0o640)
    os.chown(f, 0, 12345)
    assert trusted.problem(str(f), reader_gid=12345) is None


@root_only
def test_a_symlink_is_judged_by_both_its_place_and_its_target(tree, tmp_path):
    d, f = tree
    link = d / "link.py"
    link.symlink_to(f)
    assert trusted.problem(str(link)) is None
    other = tmp_path / "open"
    other.mkdir()
    os.chmod(other, 0o777)
    target = other / "t.py"
    target.write_text("")
    os.chmod(target, 0o644)
    (d / "bad.py").symlink_to(target)
    assert "writable by others" in trusted.problem(str(d / "bad.py"))


def test_relative_missing_and_non_regular(tmp_path):
    assert "not an absolute path" in trusted.problem("a.py")
    assert "cannot check" in trusted.problem(str(tmp_path / "missing.py"))
    with pytest.raises(PanopticonError) as e:
        trusted.check("a.py", "operator addon")
    assert e.value.hint and "chown root:root" in e.value.hint


@root_only
def test_a_directory_is_not_a_script(tree):
    d, _ = tree
    assert "not a regular file" in trusted.problem(str(d))
