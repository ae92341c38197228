from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from leftovers import kill_processes_using

# Fixtures shared by several test modules (a registry on 127.0.0.1, OCI test images).
pytest_plugins = ["oci_fixtures"]

REPO = Path(__file__).resolve().parent.parent

# The suite run with plugins disabled (BANGER_TEST_DISABLE_PLUGINS=oci pytest -m "not oci"):
# every banger the tests start gets BANGER_DISABLE_PLUGINS (BangerEnv.env), and so does
# this process, so a client made here computes the same fingerprint as their daemons.
if os.environ.get("BANGER_TEST_DISABLE_PLUGINS"):
    os.environ["BANGER_DISABLE_PLUGINS"] = os.environ["BANGER_TEST_DISABLE_PLUGINS"]
BIN = Path(sys.executable).parent
BANGER = str(BIN / "banger")


@dataclass
class BangerEnv:
    """An isolated banger installation state: its own config/state/runtime dirs."""

    root: Path
    extra_path: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        return self.root / "cfg"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    @property
    def memory_dir(self) -> Path:
        """Running QEMU guests' RAM files (BANGER_MEMORY_DIR): a tmpfs, as by default."""
        return Path("/dev/shm") / self.root.name

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "bangerd.sock"

    def env(self, **over: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_")}
        if os.environ.get("BANGER_TEST_DISABLE_PLUGINS"):  # the suite run with plugins disabled (-m "not oci")
            env["BANGER_DISABLE_PLUGINS"] = os.environ["BANGER_TEST_DISABLE_PLUGINS"]
        env.update(
            BANGER_CONFIG_DIR=str(self.config_dir),
            BANGER_STATE_DIR=str(self.state_dir),
            BANGER_CACHE_DIR=str(self.root / "cache"),
            BANGER_RUNTIME_DIR=str(self.runtime_dir),
            BANGER_MEMORY_DIR=str(self.memory_dir),
            NO_COLOR="1",
            # the network safety rule: a daemon under test changes no network namespace
            # unless its test names one it made (extra_env BANGER_NETNS=<name>)
            BANGER_NETNS="none",
        )
        if self.extra_path:
            env["PYTHONPATH"] = os.pathsep.join(self.extra_path)
        env.update(self.extra_env)
        env.update(over)
        return env

    def write_config(self, text: str) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(textwrap.dedent(text))

    def run(self, *args: str, check: bool = False, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([BANGER, *args], env=self.env(**env), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"banger {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def python(self, code: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], env=self.env(**env), capture_output=True, text=True, timeout=60
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"python exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def daemon_pid(self) -> int | None:
        try:
            return int((self.runtime_dir / "bangerd.pid").read_text())
        except (OSError, ValueError):
            return None

    def stop_daemon(self) -> None:
        pid = self.daemon_pid()
        self.run("daemon", "stop", timeout=60)
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def recv_lines(s: socket.socket) -> bytes:
    """What the daemon sends on ``s``, read until it ends with a newline (or EOF)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {pred}")


@pytest.fixture
def benv():
    with isolated_env() as env:
        yield env


@contextmanager
def isolated_env() -> Iterator[BangerEnv]:
    """A BangerEnv in a fresh directory; afterwards its daemon is stopped, any process
    still using the directory is killed, and the directory is removed."""
    # Short path: Unix socket paths are limited to 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="bg-", dir="/tmp"))
    env = BangerEnv(root)
    try:
        yield env
    finally:
        env.stop_daemon()
        leaked = kill_processes_using(root)
        shutil.rmtree(root, ignore_errors=True)
        ram = sorted(p.name for p in env.memory_dir.glob("*")) if env.memory_dir.is_dir() else []
        shutil.rmtree(env.memory_dir, ignore_errors=True)
    # VMs outlive the daemon by design; one left running by a test is a leak that
    # would slow every later boot on this machine.
    assert not leaked, f"processes left running by the test (killed): {leaked}"
    # a VM's RAM file goes with its VMM (stop, kill, delete, a daemon's reconcile)
    assert not ram, f"guest RAM files left in {env.memory_dir}: {ram}"


def make_dist(target: Path, dist: str, plugin: str, code: str, version: str = "0.0.1") -> None:
    """Write an installed distribution (module + dist-info with an entry point) by hand.

    This is what pip leaves on disk for a wheel; used for deliberately broken plugins.
    """
    module = f"banger_t_{plugin.replace('-', '_')}"
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{module}.py").write_text(textwrap.dedent(code))
    info = target / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[banger.plugins]\n{plugin} = {module}\n")
    (info / "RECORD").write_text("")


@pytest.fixture(scope="session")
def example_plugin_dir(tmp_path_factory) -> Path:
    """The out-of-tree example plugin, installed with pip into its own target dir."""
    target = tmp_path_factory.mktemp("example-plugin")
    build = tmp_path_factory.mktemp("example-src")
    src = build / "example"
    shutil.copytree(REPO / "tests" / "plugins" / "example", src)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert list(target.glob("banger_example-1.2.3.dist-info")), list(target.iterdir())
    return target


@pytest.fixture
def example_env(benv, example_plugin_dir):
    """An isolated banger with the example plugin installed (on its PYTHONPATH)."""
    benv.extra_path.append(str(example_plugin_dir))
    return benv


@pytest.fixture
def http_dir(tmp_path):
    """A directory served over HTTP on 127.0.0.1: (dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def fake_binary(tmp: Path) -> Path:
    """A `firecracker` on disk that runs the fake (tests/firecracker_fake.py, checked
    against Firecracker's OpenAPI spec) with this venv's Python."""
    exe = tmp / "firecracker"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {REPO / "tests" / "firecracker_fake.py"} "$@"\n')
    exe.chmod(0o755)
    return exe


@pytest.fixture
def fcenv(benv, example_plugin_dir, tmp_path):
    """A daemon environment with the example plugin, the fake `firecracker` and a tiny
    kernel and image (`fck`, `fcimg`): VMs are created and stopped for real through the
    daemon and CLI, with no guest booting (cheap lifecycle paths)."""
    benv.extra_path.append(str(example_plugin_dir))
    return fake_firecracker_env(benv, tmp_path)


def fake_firecracker_env(benv: BangerEnv, tmp_path: Path) -> BangerEnv:
    """Configure ``benv`` for the fake `firecracker` with a tiny kernel and image
    (`fck`, `fcimg`) registered."""
    exe = fake_binary(tmp_path)
    kdir = tmp_path / "k"
    kdir.mkdir()
    (kdir / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 1020)
    rootfs = tmp_path / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(rootfs), "16M"], check=True)
    benv.write_config(f"[vmm]\nfirecracker_binary = '{exe}'\nstop_timeout_s = 10\n")
    benv.run("kernel", "import", "fck", "--from", str(kdir), check=True)
    benv.run("image", "register", "fcimg", "--rootfs", str(rootfs), "--kernel-ref", "fck", check=True)
    return benv


def fc_create(env, name: str, proj: Path | None = None, *extra: str, check: bool = True):
    """`vm create` of a small VM on the fake firecracker (from project ``proj``)."""
    args = ["vm", "create", "--name", name, "--image", "fcimg", "--driver", "firecracker"]
    args += ["--vcpu", "1", "--memory", "128", "--root-size", "32M", *extra]
    if proj is not None:
        args += ["--project", str(proj)]
    return env.run(*args, check=check)
