"""The one process runner (banger_core.proc) and the one way to put a file or a
directory in place (banger_core.fsutil), exercised for real: real processes, real
temp dirs, failures in the middle."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from banger_core import fsutil, proc
from banger_core.errors import BangerError, Cancelled, ErrorCode
from banger_core.paths import STAGING, Paths


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --------------------------------------------------------------------------- proc.run


def test_run_captures_bytes_or_text_and_feeds_input(tmp_path):
    r = proc.run(["sh", "-c", "cat; echo err >&2"], input=b"hello")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"hello", b"err\n")
    assert proc.run(["cat"], input="text in", text=True).stdout == "text in"
    assert proc.run(["cat"], input=b"").stdout == b""  # empty input is input, not "no stdin"
    assert proc.run(["cat"]).stdout == b""  # no input: stdin is /dev/null, nothing hangs
    r = proc.run(["sh", "-c", 'pwd; echo "$BANGER_T"'], cwd=tmp_path, env={"BANGER_T": "x"}, text=True)
    assert r.stdout.split() == [str(tmp_path), "x"]
    assert "PATH" in proc.run(["env"], env={"BANGER_T": "x"}, text=True).stdout  # env adds to the daemon's own


def test_run_failure_names_what_and_the_last_stderr_line():
    with pytest.raises(proc.CommandFailed) as ei:
        proc.run(["sh", "-c", "echo one >&2; echo two >&2; exit 3"], what="doing the thing")
    e = ei.value
    assert isinstance(e, BangerError) and e.code == ErrorCode.OPERATION_FAILED
    assert e.message == "doing the thing failed: two"
    assert e.details == {"argv": ["sh", "-c", "echo one >&2; echo two >&2; exit 3"], "exit_status": 3, "stderr": "one\ntwo"}
    with pytest.raises(proc.CommandFailed, match=r"^quiet failed: exit status 4$"):
        proc.run(["sh", "-c", "exit 4"], what="quiet")


def test_run_failure_without_what_names_the_command_and_its_last_lines():
    script = "for i in 1 2 3 4 5 6 7; do echo line$i >&2; done; exit 2"
    with pytest.raises(proc.CommandFailed) as ei:
        proc.run(["sh", "-c", script])
    assert ei.value.message == "sh exited 2: line3\nline4\nline5\nline6\nline7"


def test_run_unchecked_returns_the_failure_and_echoes_it():
    said: list[str] = []
    r = proc.run(["sh", "-c", "echo nope >&2; exit 5"], check=False, echo=said.append)
    assert r.returncode == 5 and r.stderr == b"nope\n"
    assert said == ["$ sh -c 'echo nope >&2; exit 5'", "  exit 5: nope"]


def test_run_logs_each_command_and_its_status(caplog):
    with caplog.at_level(logging.INFO, logger="banger.proc"):
        proc.run(["true"])
    (rec,) = [r for r in caplog.records if r.name == "banger.proc"]
    assert rec.getMessage().startswith("ran true -> 0 in ") and rec.exit_status == 0


def test_run_a_missing_program_says_it_is_not_installed(tmp_path):
    with pytest.raises(proc.CommandFailed, match=r"^probing: no-such-tool-xyz is not installed$"):
        proc.run(["no-such-tool-xyz", "--version"], what="probing")
    with pytest.raises(proc.CommandFailed, match=r"^no-such-tool-xyz is not installed$"):
        proc.run(["no-such-tool-xyz"])
    with pytest.raises(FileNotFoundError):  # a missing cwd is the caller's bug, not a missing tool
        proc.run(["true"], cwd=tmp_path / "nope")


def test_run_timeout_kills_the_whole_process_group(tmp_path):
    pids = tmp_path / "pids"
    script = f"sleep 30 & echo $! > {pids}; echo $$ >> {pids}; sleep 30"
    t0 = time.monotonic()
    with pytest.raises(proc.CommandFailed, match=r"^waiting: sh -c .* timed out after 1s$"):
        proc.run(["sh", "-c", script], timeout=1, what="waiting")
    assert time.monotonic() - t0 < 10
    started = [int(x) for x in pids.read_text().split()]
    assert len(started) == 2
    assert wait_gone(started) == []  # the background sleep too, not only sh


# --------------------------------------------------------------------------- proc.run_long


def test_run_long_streams_lines_and_succeeds():
    lines: list[str] = []
    said: list[str] = []
    proc.run_long(["sh", "-c", "echo a; echo b >&2; echo c"], on_line=lines.append, echo=said.append)
    assert lines == ["a", "b", "c"]  # stderr is merged into the stream, in order
    assert said == ["$ sh -c 'echo a; echo b >&2; echo c'"]


def test_run_long_failure_carries_the_last_lines_errors_first():
    with pytest.raises(proc.CommandFailed) as ei:
        proc.run_long(["sh", "-c", "for i in $(seq 1 30); do echo step $i; done; echo 'Error 2: boom'; exit 2"])
    assert ei.value.message == "sh exited 2: Error 2: boom"
    with pytest.raises(proc.CommandFailed) as ei:
        proc.run_long(["sh", "-c", "for i in $(seq 1 30); do echo step $i; done; exit 1"])
    assert ei.value.message == "sh exited 1: " + "\n".join(f"step {i}" for i in range(23, 31))
    with pytest.raises(proc.CommandFailed, match=r"^no-such-tool-xyz is not installed$"):
        proc.run_long(["no-such-tool-xyz"])


def _cancel_once_started(script: str, n: int, **kw) -> tuple[list[int], float, BaseException]:
    """Run ``script`` (which prints ``n`` pids) under run_long; set cancel once it has."""
    cancel = threading.Event()
    pids: list[int] = []

    def on_line(line: str) -> None:
        pids.append(int(line))
        if len(pids) == n:
            cancel.set()

    t0 = time.monotonic()
    with pytest.raises(Cancelled) as ei:
        proc.run_long(["sh", "-c", script], on_line=on_line, cancel=cancel, **kw)
    return pids, time.monotonic() - t0, ei.value


def test_run_long_cancel_kills_the_process_group():
    pids, took, exc = _cancel_once_started("sleep 30 & echo $!; sleep 30 & echo $!; echo $$; wait", 3, what="building x")
    assert exc.message == "building x: cancelled" and exc.code == ErrorCode.CANCELLED
    assert took < 10
    assert wait_gone(pids) == []


def test_run_long_cancel_kills_what_ignores_sigterm():
    # SIG_IGN is inherited across exec: sh and its sleep both shrug off TERM, KILL follows
    pids, took, exc = _cancel_once_started("trap '' TERM; sleep 60 & echo $!; echo $$; while :; do sleep 1; done", 2)
    assert exc.message == "sh: cancelled"
    assert took < 20
    assert wait_gone(pids) == []


def test_run_long_callback_failure_stops_the_command():
    def on_line(line: str) -> None:
        raise RuntimeError(f"progress broke on {line}")

    pidfile_lines: list[int] = []
    with pytest.raises(RuntimeError, match="progress broke on "):
        proc.run_long(["sh", "-c", "sleep 30 & echo $!; sleep 30"], on_line=lambda s: (pidfile_lines.append(int(s)), on_line(s)))
    assert wait_gone(pidfile_lines) == []


# --------------------------------------------------------------------------- fsutil: files


def test_atomic_write_bytes_text_mode_and_replace(tmp_path):
    f = tmp_path / "sub" / "a.json"
    fsutil.atomic_write(f, b"one")
    assert f.read_bytes() == b"one" and (f.stat().st_mode & 0o777) == 0o644
    fsutil.atomic_write(f, "twö", mode=0o600)
    assert f.read_text() == "twö" and (f.stat().st_mode & 0o777) == 0o600
    assert entries(f.parent) == ["a.json"]


def test_atomic_write_failing_midway_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    f = tmp_path / "a.json"
    f.write_text("old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="I/O error"):
        fsutil.atomic_write(f, b"new")
    assert f.read_text() == "old"
    assert entries(tmp_path) == ["a.json"]


def test_atomic_file_publishes_only_a_complete_file(tmp_path):
    final = tmp_path / "rootfs.ext4"
    final.write_text("old")
    with pytest.raises(ValueError, match="half way"):
        with fsutil.atomic_file(final) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".rootfs.ext4.") and not tmp.exists()
            tmp.write_text("partial")
            raise ValueError("half way")
    assert final.read_text() == "old" and entries(tmp_path) == ["rootfs.ext4"]
    with fsutil.atomic_file(final) as tmp:
        tmp.write_text("new")
        assert final.read_text() == "old"  # readers see the old one until the end
    assert final.read_text() == "new" and entries(tmp_path) == ["rootfs.ext4"]
    fixed = tmp_path / ".fixed.tmp"
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_file(final, tmp=fixed) as tmp:
            assert tmp == fixed
            tmp.write_text("x")
            raise KeyboardInterrupt
    assert entries(tmp_path) == ["rootfs.ext4"]


def test_atomic_files_beside_each_other_do_not_collide(tmp_path):
    final = tmp_path / "blob"
    with fsutil.atomic_file(final) as a, fsutil.atomic_file(final) as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert final.read_text() == "a" and entries(tmp_path) == ["blob"]  # the last one in wins


def test_atomic_copy(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"k" * 10000)
    fsutil.atomic_copy(src, tmp_path / "out" / "vmlinux")
    assert (tmp_path / "out" / "vmlinux").read_bytes() == b"k" * 10000
    assert entries(tmp_path / "out") == ["vmlinux"]
    with pytest.raises(FileNotFoundError):
        fsutil.atomic_copy(tmp_path / "missing", tmp_path / "out" / "vmlinux")
    assert entries(tmp_path / "out") == ["vmlinux"]


# --------------------------------------------------------------------------- fsutil: dirs


def test_staged_dir_creates_and_replaces(tmp_path):
    final = tmp_path / "kernels" / "k1"
    with fsutil.staged_dir(final) as staging:
        assert staging.parent == final.parent and staging.name.startswith(f".k1{STAGING}")
        (staging / "vmlinux").write_text("v1")
        assert not final.exists()
    assert (final / "vmlinux").read_text() == "v1"
    with fsutil.staged_dir(final) as staging:
        (staging / "vmlinux").write_text("v2")
        assert (final / "vmlinux").read_text() == "v1"  # the old one stays until the new one is complete
    assert entries(final) == ["vmlinux"] and (final / "vmlinux").read_text() == "v2"
    assert entries(final.parent) == ["k1"]  # no staging dir, no .k1.old


def test_staged_dir_failure_removes_staging_and_keeps_the_old(tmp_path):
    final = tmp_path / "img"
    final.mkdir()
    (final / "keep").write_text("old")
    with pytest.raises(RuntimeError, match="build broke"):
        with fsutil.staged_dir(final) as staging:
            (staging / "deep" / "er").mkdir(parents=True)
            raise RuntimeError("build broke")
    assert entries(tmp_path) == ["img"] and (final / "keep").read_text() == "old"
    removed: list[Path] = []
    with pytest.raises(KeyboardInterrupt):
        with fsutil.staged_dir(final, discard=removed.append) as staging:
            raise KeyboardInterrupt
    assert removed == [staging]  # the caller's way of removing (e.g. unmount first) was used


def test_replace_dir_puts_the_old_back_when_the_new_cannot_go_in(tmp_path, monkeypatch):
    final = tmp_path / "k"
    final.mkdir()
    (final / "old").write_text("1")
    src = tmp_path / "new"
    src.mkdir()
    real = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if self == src:
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        fsutil.replace_dir(src, final)
    assert (final / "old").read_text() == "1" and entries(tmp_path) == ["k", "new"]


def test_a_replacement_cut_off_midway_is_repaired_by_the_daemon_sweep(tmp_path):
    """A daemon killed between "old aside" and "new in" leaves .NAME.old and the
    staging dir; the next daemon's start-up sweep puts the old one back."""
    from banger_core.daemon.server import _sweep_leftovers

    paths = Paths(config_dir=tmp_path / "c", state_dir=tmp_path / "s", cache_dir=tmp_path / "ca", runtime_dir=tmp_path / "r")
    final = paths.kernels_dir / "k1"
    final.mkdir(parents=True)
    (final / "vmlinux").write_text("v1")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child dies by design
        try:
            real = Path.rename

            def rename(self: Path, target: Path) -> Path:
                if STAGING in self.name:
                    os._exit(9)  # the daemon is killed right here
                return real(self, target)

            Path.rename = rename
            with fsutil.staged_dir(final) as staging:
                (staging / "vmlinux").write_text("v2")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    left = entries(paths.kernels_dir)
    assert ".k1.old" in left and "k1" not in left and any(STAGING in n for n in left)
    assert sorted(p.name for p in paths.transient_leftovers()) == sorted(left)
    _sweep_leftovers(paths)
    assert entries(paths.kernels_dir) == ["k1"] and (final / "vmlinux").read_text() == "v1"
