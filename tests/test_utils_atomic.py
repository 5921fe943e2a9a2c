"""The one atomic-save helper: whole or nothing, permissions as open() gives, others' files kept."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from llmkit.utils import atomic_directory, atomic_write, recover_directory, write_text
from llmkit.utils.atomic import default_mode


def test_atomic_write_replaces_and_keeps_umask_mode(tmp_path):
    path = tmp_path / "f.txt"
    old = os.umask(0o022)
    try:
        write_text(path, "one")
        assert path.read_text() == "one"
        assert (path.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600
        os.chmod(path, 0o640)
        write_text(path, "two")
        assert path.read_text() == "two"
        assert (path.stat().st_mode & 0o777) == 0o640  # the replaced file's mode is kept
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_failure_leaves_old_content(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_text(tmp_path / "missing" / "f", "x")
    with pytest.raises(IsADirectoryError):
        write_text(tmp_path, "x")
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "f", "a"):
            pass


def test_atomic_directory_new_replace_and_keep_other_files(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as d:
        (d / "weights").write_text("v1")
        (d / "config").write_text("c1")
    assert sorted(p.name for p in target.iterdir()) == ["config", "weights"]
    assert (target.stat().st_mode & 0o777) == default_mode(directory=True)
    (target / "tokenizer.json").write_text("user's")
    (target / "stale-shard").write_text("old shard")
    with atomic_directory(target, discard=["stale-*"]) as d:
        (d / "weights").write_text("v2")
        (d / "config").write_text("c2")
    assert (target / "weights").read_text() == "v2" and (target / "config").read_text() == "c2"
    assert (target / "tokenizer.json").read_text() == "user's"  # carried over, not deleted
    assert not (target / "stale-shard").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporaries left


def test_atomic_directory_failure_leaves_old(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as d:
        (d / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as d:
            (d / "a").write_text("new")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_atomic_directory_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        with atomic_directory(tmp_path / "f"):
            pass


def test_recover_directory_after_a_kill_between_fallback_renames(tmp_path):
    # What the two-rename fallback leaves when killed between its renames.
    old = tmp_path / ".adapter.old-abc"
    old.mkdir()
    (old / "a").write_text("old")
    assert recover_directory(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "a").read_text() == "old"
    assert not recover_directory(tmp_path / "adapter")


def test_sigkill_during_directory_saves_leaves_a_whole_directory(tmp_path):
    # Each save writes two files that must agree; kill -9 the saver at random moments.
    target = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys
        from llmkit.utils import atomic_directory
        i = 0
        while True:
            i += 1
            with atomic_directory({str(target)!r}) as d:
                (d / "weights").write_bytes(str(i).encode() * 200_000)
                (d / "config").write_text(str(i))
            if i == 3:
                print("go", flush=True)
    """)
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "go"
        import time
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recover_directory(target)
        n = (target / "config").read_text()
        assert (target / "weights").read_bytes() == n.encode() * 200_000
