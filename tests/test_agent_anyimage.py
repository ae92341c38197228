"""The guest agent on any image, python3 or not: the agent disk carries an interpreter
assembled from the host's python3 (banger_agent.interpreter), and its run script uses
the image's own python3 only when that imports every module the agent uses.

Without a VM: the real agent disk (its ext4, dumped with debugfs) in a chroot holding
only a static busybox, the agent on the disk's interpreter answering over a socketpair
(BANGER_AGENT_FD), as in test_agent_channel. With VMs (2 boots: debian-cloud, whose
virtio_console the initrd loads, and microvm-6.1, whose
virtio_console is built in): a busybox-only OCI image pulled from a local registry runs
`vm run --rm` and `vm exec`, and has no python3.
"""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import guest_assets as ga
from banger_agent import guestfiles, interpreter
from banger_agent.channel import Channel
from banger_guest import protocol as P
from conftest import BANGER, isolated_env
from oci_fixtures import find_static_busybox, missing_tools, push_layers
from test_agent_channel import run

BUILD = {"banger": "test", "commit": None, "build_time": None}
LONG = 1500


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Path:
    return guestfiles.agent_disk(tmp_path_factory.mktemp("agent-cache"), BUILD)


def busybox_root(root: Path, disk: Path) -> Path:
    """``root``: a static busybox and its applets, /dev/null, /tmp, and the agent disk's
    files at /agentdisk (what the launcher mounts at /run/banger-agent)."""
    busybox = find_static_busybox()
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "busybox").write_bytes(busybox.read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            (root / "bin" / a).symlink_to("busybox")
    for d in ("dev", "tmp", "agentdisk"):
        (root / d).mkdir()
    os.mknod(root / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    r = subprocess.run(["debugfs", "-R", f"rdump / {root / 'agentdisk'}", str(disk)], capture_output=True, text=True)
    assert (root / "agentdisk" / "run").exists(), r.stderr
    return root


def python_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("python*") if "agentdisk" not in p.parts]


def serve(argv: list[str], log: Path, path: str = "/bin") -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the agent (``argv``) on one end of a socketpair; (process, the other end)."""
    host, guest = socket.socketpair()
    env = {"BANGER_AGENT_FD": str(guest.fileno()), "PATH": path}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, pass_fds=[guest.fileno()], env=env, stdin=subprocess.DEVNULL, stderr=fh)
    guest.close()
    return proc, host


def talk(host: socket.socket, script) -> None:
    async def main():
        async def opener():
            return await asyncio.open_unix_connection(sock=host)

        ch = await Channel.connect(opener, timeout=30)
        health = await ch.call({"op": "health"}, timeout=30)
        assert health["version"] == P.VERSION
        await script(ch)
        await ch.close()

    asyncio.run(main())


def stop(proc: subprocess.Popen[bytes], host: socket.socket) -> None:
    host.close()
    proc.kill()
    proc.wait(timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
@pytest.mark.parametrize("image_python", ["none", "too-small"])
def test_the_agent_runs_in_a_busybox_chroot_on_the_disks_python(disk, tmp_path, image_python):
    root = busybox_root(tmp_path / "root", disk)
    if image_python == "too-small":  # a python3 that imports nothing: the probe fails
        (root / "usr" / "bin").mkdir(parents=True)
        (root / "usr" / "bin" / "python3").write_text("#!/bin/sh\nexit 1\n")
        (root / "usr" / "bin" / "python3").chmod(0o755)
    else:
        assert python_files(root) == []
    log = tmp_path / "agent.log"
    proc, host = serve([shutil.which("chroot") or "/usr/sbin/chroot", str(root), "/agentdisk/run"], log)
    try:

        async def script(ch: Channel) -> None:
            status, out, err = await run(ch, ["sh", "-c", "echo hello from $(uname -s); command -v python3 || echo none"])
            assert status == 0, err
            expected = b"/usr/bin/python3\n" if image_python == "too-small" else b"none\n"
            assert out == b"hello from Linux\n" + expected
            assert (await run(ch, ["sh", "-c", "exit 42"]))[0] == 42
            data = os.urandom(256 * 1024)
            status, out, _ = await run(ch, ["cat"], stdin=data)
            assert status == 0 and out == data
            assert (await run(ch, ["/no/such/cmd"]))[0] == 127

        talk(host, script)
    finally:
        stop(proc, host)
    said = log.read_text()
    assert "running on banger's own python 3." in said, said
    # a python3 that will not even start (exit 1) falls back as one lacking a module does
    assert ("the agent on the image's /usr/bin/python3 exited 1" in said) == (image_python == "too-small"), said


def run_true_off_the_disk(disk: Path, tmp_path: Path, path: str) -> str:
    """The disk's run script (unpacked, no chroot) with ``path`` as PATH: the agent it
    starts runs `true`; what the agent logged."""
    subprocess.run(["debugfs", "-R", f"rdump / {tmp_path}", str(disk)], capture_output=True, check=True)
    log = tmp_path / "agent.log"
    proc, host = serve([str(tmp_path / "run")], log, path=path)
    try:

        async def script(ch: Channel) -> None:
            assert (await run(ch, ["true"]))[0] == 0

        talk(host, script)
    finally:
        stop(proc, host)
    return log.read_text()


def test_an_image_python3_with_every_module_runs_the_agent_itself(disk, tmp_path):
    """The host's /usr/bin/python3 passes the probe: the run script uses it (no chroot)."""
    assert "running on the image's /usr/bin/python3" in run_true_off_the_disk(disk, tmp_path, "/usr/bin:/bin")


def test_an_image_python3_lacking_a_module_hands_over_to_the_next_python_in_one_start(disk, tmp_path):
    """Debian's python3-minimal has no pty: the agent started on it finds what it needs
    first, exits 75, and the run script goes on to the next python (one start each)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # a python3 whose import system finds no pty: runs the -c code it is given after
    # hiding pty (written in python: the run script's -S would skip a sitecustomize)
    (bindir / "python3").write_text(
        "#!/usr/bin/python3 -S\n"
        "import sys\n"
        "class NoPty:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pty':\n"
        "            raise ModuleNotFoundError('no pty in this python')\n"
        "sys.meta_path.insert(0, NoPty())\n"
        "code = sys.argv[sys.argv.index('-c') + 1]\n"
        "sys.argv = ['-c']\n"
        "exec(compile(code, '<string>', 'exec'), {'__name__': '__main__'})\n"
    )
    (bindir / "python3").chmod(0o755)
    said = run_true_off_the_disk(disk, tmp_path, f"{bindir}:/usr/bin:/bin")
    assert "cannot import pty (ModuleNotFoundError: no pty in this python)" in said, said
    assert f"the image's {bindir}/python3 cannot import all of:" in said, said
    # the next python3 the script tries (the real one: this "image" is the host) serves;
    # in a chroot with no other, the disk's python does (the test above)
    assert "running on the image's /usr/bin/python3" in said, said


def test_what_the_interpreter_holds_and_how_the_disk_is_named(disk):
    python = interpreter.ensure(disk.parent, guestfiles._guest_sources())
    probe = set(python.probe)
    assert set(interpreter.REQUIRED) <= probe  # the modules the agent is about to use
    assert interpreter.agent_imports(guestfiles._guest_sources()) >= {"json", "selectors", "subprocess"}
    out = disk.parent / "dumped"
    out.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump /modules {out}", str(disk)], capture_output=True, check=True)
    assert set((out / "modules").read_text().strip().split(", ")) == probe  # what the run script probes
    manifest = json.loads((python.root / "manifest.json").read_text())
    for m in ("tarfile", "pty", "tty", "ssl", "json", "selectors", "subprocess", "shutil", "glob", "gzip", "encodings.utf_8"):
        assert m in manifest["modules"], m
    libs = {p.name for p in (python.root / "libs").iterdir()}
    assert {"libc.so.6", "ld-linux-x86-64.so.2", "libssl.so.3", "libcrypto.so.3"} <= libs, libs
    size = python.size()
    print(f"interpreter {python.identity}: {size / 1e6:.1f} MB in {python.root}")
    assert size < 20 * 1024 * 1024
    # the disk's id follows the interpreter, the agent and the build
    assert guestfiles.disk_id(BUILD, python.identity) in disk.name
    assert guestfiles.disk_id(BUILD, "3.11.2-other") != guestfiles.disk_id(BUILD, python.identity)


def _ensure_in_a_process(where: str, sources: dict[str, bytes]) -> str:
    return str(interpreter.ensure(Path(where), sources).root)


def test_concurrent_assemblies_leave_one_interpreter(tmp_path):
    sources = guestfiles._guest_sources()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        roots = pool.starmap(_ensure_in_a_process, [(str(tmp_path), sources)] * 3)
    assert len(set(roots)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [Path(roots[0]).name]  # no staging dir left
    t = time.monotonic()
    assert str(interpreter.ensure(tmp_path, sources).root) == roots[0]
    assert time.monotonic() - t < 0.5  # reused, not rebuilt


# --- in VMs ---------------------------------------------------------------------------


def busybox_layer() -> bytes:
    """One layer: a static busybox with all its applets in /bin, and nothing else."""
    busybox = find_static_busybox()
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "root"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(ti)
        data = busybox.read_bytes()
        ti = tarfile.TarInfo("bin/busybox")
        ti.size, ti.mode = len(data), 0o755
        tar.addfile(ti, io.BytesIO(data))
        for a in applets:
            if a != "busybox":
                ti = tarfile.TarInfo(f"bin/{a}")
                ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(ti)
        release = b"ID=nopython\n"
        ti = tarfile.TarInfo("etc/os-release")
        ti.size = len(release)
        tar.addfile(ti, io.BytesIO(release))
    return out.getvalue()


@pytest.fixture(scope="module")
def nopy(oci_registry, tmp_path_factory):
    """An isolated banger with the busybox-only image as `nopy` (the default kernel for
    OCI pulls, debian-cloud, whose virtio_console is a module the image lacks: the
    initrd loads it) and as `nopy-micro` (microvm-6.1, where it is built in)."""
    pushed = push_layers(oci_registry, "banger/nopython", "1", [busybox_layer()], tmp_path_factory.mktemp("nopy"))
    with isolated_env() as e:
        e.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
        e.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n")
        e.run("kernel", "pull", "microvm-6.1", check=True, timeout=LONG)
        e.run("image", "pull", pushed["ref"], "--name", "nopy", check=True, timeout=LONG)
        e.run("image", "pull", pushed["ref"], "--name", "nopy-micro", "--kernel-ref", "microvm-6.1", check=True, timeout=300)
        yield e


@pytest.mark.oci
@pytest.mark.slow
@pytest.mark.skipif(bool(missing_tools()), reason=f"needs {missing_tools()} (scripts/install.sh installs them)")
def test_vm_run_and_exec_on_a_busybox_only_oci_image(nopy):
    env = nopy
    args = ["--vcpu", "1", "--memory", "256M"]
    r = env.run(
        "vm", "run", "--rm", "--image", "nopy", *args, "--", "sh", "-c", "echo hi from $(cat /etc/os-release)", timeout=600
    )
    assert r.returncode == 0 and r.stdout == "hi from ID=nopython\n", r.stderr
    assert json.loads(env.run("vm", "list", "--json", check=True).stdout) == []
    env.run("vm", "run", "-d", "--name", "nopy1", "--image", "nopy-micro", *args, check=True, timeout=600)
    try:
        ex = [BANGER, "vm", "exec", "nopy1", "--"]
        r = subprocess.run([*ex, "sh", "-c", "command -v python3"], env=env.env(), capture_output=True, timeout=120)
        assert r.returncode != 0 and r.stdout == b"", r
        r = subprocess.run([*ex, "cat"], input=b"round trip\n", env=env.env(), capture_output=True, timeout=120)
        assert (r.returncode, r.stdout) == (0, b"round trip\n"), r.stderr
        log = env.run("vm", "logs", "nopy1", "-n", "0", check=True).stdout
        assert "running on banger's own python 3." in log, log[-3000:]
    finally:
        env.run("vm", "delete", "nopy1", "--force", timeout=120)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
