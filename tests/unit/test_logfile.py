import json
import multiprocessing
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from panopticond import logread
from panopticond.logfile import LogFile, rotated_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def line(**fields) -> bytes:
    return (json.dumps(fields) + "\n").encode()


def records(path) -> list[dict]:
    return list(logread.read_log(str(path)))


def test_appends_whole_lines_with_mode_0640_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        log = LogFile(str(tmp_path / "r.jsonl"))
        log.append(line(n=1))
        log.append(line(n=2))
    finally:
        os.umask(old)
    assert [r["n"] for r in records(tmp_path / "r.jsonl")] == [1, 2]
    assert stat.S_IMODE(os.stat(tmp_path / "r.jsonl").st_mode) == 0o640


def test_rotation_keeps_a_bounded_number_of_files_in_order(tmp_path):
    path = str(tmp_path / "r.jsonl")
    log = LogFile(path, max_bytes=200, keep=3)
    for n in range(100):
        log.append(line(n=n, pad="x" * 20))
    names = sorted(os.listdir(tmp_path))
    assert names == ["r.jsonl", "r.jsonl.1", "r.jsonl.2", "r.jsonl.3"]
    assert all(os.path.getsize(tmp_path / n) <= 200 for n in names)
    assert all(stat.S_IMODE(os.stat(tmp_path / n).st_mode) == 0o640 for n in names)
    seen = [r["n"] for r in records(path)]
    # The oldest files were dropped whole: what is left is the most recent run of records.
    assert seen == list(range(100 - len(seen), 100))


def test_a_record_larger_than_the_limit_gets_a_file_of_its_own(tmp_path):
    path = str(tmp_path / "r.jsonl")
    log = LogFile(path, max_bytes=100, keep=5)
    log.append(line(n=0))
    log.append(line(n=1, big="y" * 300))
    log.append(line(n=2))
    assert [r["n"] for r in records(path)] == [0, 1, 2]
    assert [r["n"] for r in logread.read_files([rotated_path(path, 1)])] == [1]


def test_zero_never_rotates(tmp_path):
    log = LogFile(str(tmp_path / "r.jsonl"), max_bytes=0)
    for n in range(50):
        log.append(line(n=n, pad="z" * 50))
    assert os.listdir(tmp_path) == ["r.jsonl"]


def _writer(path: str, wid: int, count: int, max_bytes: int, keep: int) -> None:
    log = LogFile(path, max_bytes=max_bytes, keep=keep)
    for n in range(count):
        log.append(line(w=wid, n=n, pad="p" * (n % 37)))


@pytest.mark.parametrize("keep", [200, 2])
def test_concurrent_writers_lose_split_or_duplicate_nothing(tmp_path, keep):
    path = str(tmp_path / "r.jsonl")
    writers, count, max_bytes = 4, 400, 4096
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, count, max_bytes, keep))
             for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    stats = logread.Stats()
    got = list(logread.read_log(path, stats))
    assert stats.bad_lines == 0  # no line was split or interleaved
    files = logread.rotation_set(path)
    assert len(files) <= keep + 1
    assert all(os.path.getsize(f) <= max_bytes for f in files)
    by_writer: dict[int, list[int]] = {}
    for r in got:
        by_writer.setdefault(r["w"], []).append(r["n"])
    for w in range(writers):
        ns = by_writer.get(w, [])
        # Each writer's surviving records are the latest ones, in order, each once.
        assert ns == list(range(count - len(ns), count)), (w, ns[:5])
    if keep == 200:
        assert len(got) == writers * count  # nothing dropped while everything is kept


def test_a_half_written_record_is_cut_back(tmp_path):
    # RLIMIT_FSIZE makes the kernel write part of a record and then refuse: a real
    # short write, as on a disk that fills up in the middle of one.
    path = tmp_path / "r.jsonl"
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        sys.path.insert(0, {ROOT!r})
        from panopticond.logfile import LogFile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log = LogFile({str(path)!r})
        log.append(b'{{"n": 1}}\\n')
        resource.setrlimit(resource.RLIMIT_FSIZE, (20, resource.RLIM_INFINITY))
        try:
            log.append(b'{{"n": 2, "pad": "' + b'x' * 40 + b'"}}\\n')
            print("no error")
        except OSError as e:
            print("error", e.errno)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        log.append(b'{{"n": 3}}\\n')
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "error"
    stats = logread.Stats()
    assert [r["n"] for r in logread.read_log(str(path), stats)] == [1, 3]
    assert stats.bad_lines == 0


def test_follows_a_file_replaced_behind_its_back(tmp_path):
    path = tmp_path / "r.jsonl"
    log = LogFile(str(path))
    log.append(line(n=1))
    os.rename(path, tmp_path / "old")  # an external logrotate
    log.append(line(n=2))
    assert [r["n"] for r in records(path)] == [2]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change users")


@needs_root
def test_root_keeps_the_owner_of_the_file_it_rotates(tmp_path):
    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "r.jsonl"
    path.write_bytes(line(n=0))
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    log = LogFile(str(path), max_bytes=30, keep=2)
    log.append(line(n=1, pad="q" * 20))
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert stat.S_IMODE(st.st_mode) == 0o640


@needs_root
def test_a_rotation_refused_loses_nothing_and_says_why(request):
    # The proxy user may append to a log in a directory it cannot rename in
    # (`panopticon run --log /some/root/dir/file`): the log grows, nothing is lost.
    nobody = pwd.getpwnam("nobody")
    tmp_path = Path(tempfile.mkdtemp(prefix="pnt-logfile-"))  # pytest's is root's alone
    request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "r.jsonl"
    path.touch()
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from panopticond.logfile import LogFile
        os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})
        log = LogFile({str(path)!r}, max_bytes=50, keep=2)
        for n in range(5):
            log.append(b'{{"n": %d, "pad": "xxxxxxxxxxxxxxxxxxxx"}}\\n' % n)
        print(log.rotation_error)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "cannot rotate" in out.stdout and "Permission denied" in out.stdout
    assert [r["n"] for r in records(path)] == [0, 1, 2, 3, 4]
    assert os.listdir(tmp_path) == ["r.jsonl"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        LogFile("/x", keep=0)
    with pytest.raises(ValueError):
        LogFile("/x", max_bytes=-1)
