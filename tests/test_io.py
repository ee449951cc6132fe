"""results.jsonl recovery, atomic writes with umask permissions, the output-directory lock."""
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from robcomp._io import DirectoryBusyError, DirectoryLock, write_text_atomic
from robcomp.report.results import append_record, read_records


def _lines(path):
    return path.read_text().splitlines()


def test_partial_last_line_is_skipped_on_read_and_dropped_on_append(tmp_path):
    path = tmp_path / "results.jsonl"
    append_record(path, {"point_id": "a", "v": 1})
    append_record(path, {"point_id": "b", "v": 2})
    with open(path, "a") as f:  # a writer killed mid-append
        f.write('{"point_id": "c", "v"')
    with pytest.raises(ValueError, match=r"results.jsonl:3 is not valid JSON"):
        read_records(path)
    with pytest.warns(UserWarning, match="partial last line"):
        assert [r["point_id"] for r in read_records(path, tolerate_partial_last_line=True)] == ["a", "b"]
    with pytest.warns(UserWarning):
        append_record(path, {"point_id": "c", "v": 3})
    assert [json.loads(line)["point_id"] for line in _lines(path)] == ["a", "b", "c"]
    assert [r["v"] for r in read_records(path)] == [1, 2, 3]  # strict read: the file is whole again


def test_corrupt_middle_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "results.jsonl"
    for i in range(3):
        append_record(path, {"point_id": str(i)})
    lines = _lines(path)
    lines[1] = lines[1][:5]
    path.write_text("\n".join(lines) + "\n")
    for tolerate in (False, True):
        with pytest.raises(ValueError, match=r"results.jsonl:2 is not valid JSON"):
            read_records(path, tolerate_partial_last_line=tolerate)
    with pytest.raises(ValueError, match=r"results.jsonl:2"):
        append_record(path, {"point_id": "3"})  # never appends after damage it cannot repair
    path.write_text('{"point_id": "0"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r":2 holds a JSON list, not a result record"):
        read_records(path)


def test_atomic_files_get_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        append_record(tmp_path / "r.jsonl", {"a": 1})
    finally:
        os.umask(old)
    for name in ("a.txt", "r.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "r.jsonl"]  # no temporary left


HOLD = textwrap.dedent("""
    import sys, time
    from robcomp._io import DirectoryLock
    with DirectoryLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def test_lock_refuses_a_second_process_and_is_released_on_exit(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryBusyError, match=rf"in use by another robcomp run \(pid {holder.pid}\)"):
            DirectoryLock(tmp_path).acquire()
    finally:
        holder.kill()  # like kill -9: the OS drops the lock with the process
        holder.wait()
    with DirectoryLock(tmp_path):
        pass


def test_one_cache_dir_robcomp_then_xdg_then_home(tmp_path, monkeypatch):
    from robcomp._io import cache_dir

    monkeypatch.setenv("ROBCOMP_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "own"
    monkeypatch.delenv("ROBCOMP_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "robcomp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "robcomp"


def test_append_text_atomic_keeps_what_keep_returns(tmp_path):
    from robcomp._io import append_text_atomic

    path = tmp_path / "log.txt"
    append_text_atomic(path, "a\n")
    append_text_atomic(path, "b\n")
    append_text_atomic(path, "c\n", keep=lambda old: old[:-2])  # drop the last line first
    assert path.read_text() == "a\nc\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == _umask_mode()


def _umask_mode():
    from robcomp._io import umask_mode

    return umask_mode()
