#!/usr/bin/env python3
"""`banger vm exec` against ssh to the same guest: round trip, stdout throughput, and the
daemon's memory while a large output streams (issue 12, item 6).

    round trip   `banger vm exec VM -- true`, --calls times, each the wall time of the CLI
                 process as a user sees it (start to exit; stdin /dev/null, output
                 discarded): p50 and p99. Against `ssh root@guest true` the same number
                 of times, a fresh connection each (what a user types), and the same
                 over one ssh ControlMaster connection (multiplexed: no handshake, so
                 not what a user gets by default; shown for reference)
    throughput   `vm exec VM -- head -c BYTES /dev/zero` and `ssh ... head -c BYTES
                 /dev/zero`, stdout read from a pipe on the host and counted; MB/s
                 (10^6 bytes) over the whole command, CLI/ssh start to exit
    daemon RSS   `vm exec VM -- head -c RSS_BYTES /dev/zero` read as above while bangerd's
                 VmRSS (/proc/PID/status; PID from `banger daemon status --json`) is
                 sampled every 20 ms: the largest growth over its RSS just before

Both sides run the same guest: the default image (debian-bookworm) on its default kernel,
same vCPUs and memory, under TCG. banger's side is a VM of an isolated banger (fresh
config/state/runtime dirs with [vmm] accel = 'tcg'; the cache is the test suite's,
/var/cache/banger-test/banger-cache, where the image is built). ssh's side, since banger
VMs have no network yet, is a bare qemu-system-x86_64 with the command line banger's QEMU
driver makes for that same VM's Machine (kernel, initrd, boot args, agent disk and
channel), its root disk a qcow2 overlay of a copy of the image's rootfs into which a
throwaway key (root's authorized_keys) and systemd-networkd with DHCP on the NIC are
written with `debugfs -w`, plus a virtio-net NIC on QEMU's user network forwarding a
host port to the guest's sshd. The two are measured one after the other, never at once:
the host has 2 cores, and a second TCG guest booting or idling beside the one measured
would take CPU from it. So: banger's VM is created and measured, then deleted; then the
bare QEMU guest boots and is measured with banger's daemon idle. The issue's targets are
printed beside the results; the CLI runs with Python's bytecode cache on, as installed
(PYTHONDONTWRITEBYTECODE unset for it), after one warm-up call; nothing is asserted (the exit status is non-zero only when
something fails to run). Everything started is stopped and removed at the end, also on
error, Ctrl-C or SIGTERM.

    .venv/bin/python benchmarks/exec.py [--calls 50] [--bytes 256M] [--rss-bytes 1G] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from report import TEST_CACHE, banger_env, print_table

BANGER = Path(sys.executable).parent / "banger"
IMAGE = "debian-bookworm"
VM = "execbench"
BOOT_TIMEOUT = 600.0
RSS_EVERY = 0.02
CHUNK = 1 << 20
SIZE_RE = re.compile(r"(\d+)([KMG]?)", re.I)
NETWORK_UNIT = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n"
TARGETS = {"round trip": 5.0, "throughput": 1.0, "rss_mib": 50.0}


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``64K`` (powers of 1024, as head -c reads them) or bytes."""
    m = SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 256M, 1G or a number of bytes")
    return int(m.group(1)) * 1024 ** " KMG".index(m.group(2).upper() or " ")


def human(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def pct(values: list[float], p: int) -> float:
    """The p-th percentile (linear interpolation between the closest ranks)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stream(argv: list[str], env: dict[str, str] | None, expect: int, timeout: float) -> float:
    """Run ``argv``, read its stdout through a pipe to the end, check that it is
    ``expect`` bytes and that it exits 0; the wall time from start to exit."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        assert p.stdout is not None and p.stderr is not None
        got = 0
        fd = p.stdout.fileno()
        while chunk := os.read(fd, CHUNK):
            got += len(chunk)
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{argv[0]} still streaming after {timeout:.0f}s ({got} bytes)")
        rc = p.wait(timeout=60)
        wall = time.perf_counter() - t0
        err = p.stderr.read().decode(errors="replace").strip()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if rc != 0 or got != expect:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {rc} after {got} of {expect} bytes: {err[-800:]}")
    return wall


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User+system CPU seconds so far of each of ``pids`` and, as ``client``, of this
    process's waited-for children (the banger CLI or ssh client of a stream)."""
    out = {}
    for what, pid in pids.items():
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # fields[0] is stat(5)'s field 3
        out[what] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["client"] = ru.ru_utime + ru.ru_stime
    return out


def timed_stream(
    argv: list[str], env: dict[str, str] | None, expect: int, pids: dict[str, int]
) -> tuple[float, dict[str, float]]:
    """``stream`` and the CPU seconds ``pids`` and the client spent meanwhile."""
    before = cpu_seconds(pids)
    wall = stream(argv, env, expect, timeout=3600)
    after = cpu_seconds(pids)
    return wall, {k: after[k] - before[k] for k in after}


class RssSampler(threading.Thread):
    """VmRSS of one process every RSS_EVERY seconds until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self.done = threading.Event()

    @staticmethod
    def read(pid: int) -> int:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {pid}")

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.samples.append(self.read(self.pid))
            except (OSError, RuntimeError):
                return
            self.done.wait(RSS_EVERY)


class Bench:
    def __init__(self, root: Path, vcpu: int, memory: str) -> None:
        self.root = root
        self.vcpu, self.memory = vcpu, memory
        self.env = banger_env(root, cache=TEST_CACHE)  # the CLI with its bytecode cache on
        (root / "cfg").mkdir(parents=True)
        (root / "cfg" / "config.toml").write_text("[vmm]\naccel = 'tcg'\n")
        self.bare_dir = root / "bare"
        self.bare_pid: int | None = None
        self.master: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.key = root / "id_ed25519"

    # --- banger -----------------------------------------------------------------------
    def banger(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(BANGER), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"banger {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-800:]}")
        return r

    def create_vm(self) -> tuple[str, dict[str, Any]]:
        """The image's rootfs and the Machine of a running VM of it."""
        self.banger("image", "pull", IMAGE)
        rootfs = json.loads(self.banger("image", "show", IMAGE, "--json").stdout)["rootfs"]
        t0 = time.monotonic()
        self.banger("vm", "run", "-d", "--name", VM, "--image", IMAGE, "--vcpu", str(self.vcpu), "--memory", self.memory)
        log(f"banger VM up in {time.monotonic() - t0:.1f}s")
        machine = json.loads(self.banger("vm", "show", VM, "--json").stdout)["machine"]
        # The bare guest gets copies of the other drives (the agent disk): the shared cache
        # keeps only the current build's agent disk, and another build may replace it.
        keep = self.root / "drives"
        keep.mkdir()
        for drive in machine["drives"][1:]:
            copy = keep / f"{drive['id']}-{Path(drive['path']).name}"
            shutil.copyfile(drive["path"], copy)
            drive["path"] = str(copy)
        return rootfs, machine

    def daemon_pid(self) -> int:
        return int(json.loads(self.banger("daemon", "status", "--json").stdout)["pid"])

    def vmm_pid(self) -> int:
        (pidfile,) = (self.root / "state" / "vms").glob("*/vmm.pid")
        return int(pidfile.read_text().strip())

    def exec_argv(self, *cmd: str) -> list[str]:
        return [str(BANGER), "vm", "exec", VM, "--", *cmd]

    # --- the bare QEMU guest with sshd ----------------------------------------------------
    def prepare_disk(self, rootfs: str, machine: dict[str, Any]) -> Path:
        """A copy of ``rootfs`` with the throwaway key and DHCP on the NIC, under a qcow2
        overlay the size of banger's root disk."""
        d = self.bare_dir
        d.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "exec-bench", "-f", str(self.key)], check=True)
        copy = d / "rootfs.ext4"
        subprocess.run(["cp", "--sparse=always", rootfs, str(copy)], check=True)
        (d / "authorized_keys").write_bytes(self.key.with_suffix(".pub").read_bytes())
        (d / "dhcp.network").write_text(NETWORK_UNIT)
        os.chmod(d / "authorized_keys", 0o600)
        os.chmod(d / "dhcp.network", 0o644)
        cmds = [
            "mkdir /etc/systemd/network",  # exists in the image; harmless if so
            f"write {d / 'dhcp.network'} /etc/systemd/network/20-exec-bench.network",
            "symlink /etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
            " /lib/systemd/system/systemd-networkd.service",
            "mkdir /root/.ssh",
            f"write {d / 'authorized_keys'} /root/.ssh/authorized_keys",
        ]
        for path, mode in (
            ("/etc/systemd/network/20-exec-bench.network", "0100644"),
            ("/root/.ssh", "040700"),
            ("/root/.ssh/authorized_keys", "0100600"),
        ):
            cmds += [f"sif {path} mode {mode}", f"sif {path} uid 0", f"sif {path} gid 0"]
        (d / "debugfs.cmds").write_text("\n".join(cmds) + "\n")
        subprocess.run(["debugfs", "-w", "-f", str(d / "debugfs.cmds"), str(copy)], check=True, capture_output=True)
        check = subprocess.run(
            ["debugfs", "-R", "cat /root/.ssh/authorized_keys", str(copy)], check=True, capture_output=True, text=True
        )
        if self.key.with_suffix(".pub").read_text().strip() not in check.stdout:
            raise RuntimeError(f"debugfs did not write the key into {copy}")
        size = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", machine["drives"][0]["path"]],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )["virtual-size"]
        disk = d / "root.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(copy), str(disk), str(size)], check=True
        )
        return disk

    def boot_bare(self, machine: dict[str, Any], disk: Path) -> float:
        from banger_core.models import Machine
        from banger_core.vmm.qemu import QemuDriver

        d = self.bare_dir
        name = f"execbench-ssh-{os.getpid()}"
        m = Machine.model_validate(machine)
        m.drives[0].path = str(disk)
        if m.agent is not None:
            m.agent.host_path = str(d / "agent.sock")  # nobody connects: the agent idles as in banger's VM
        m.console_log = str(d / "console.log")
        m.boot_args = [a if not a.startswith("banger.vm=") else f"banger.vm={name}" for a in m.boot_args]
        m.nics = []
        argv = QemuDriver().argv(name, m, d, "tcg")
        micro = "microvm" in argv[argv.index("-M") + 1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv += [
            "-netdev",
            f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device",
            f"{'virtio-net-device' if micro else 'virtio-net-pci'},netdev=n0",
        ]
        t0 = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)  # -daemonize: returns once QEMU runs
        if r.returncode != 0:
            raise RuntimeError(f"qemu-system-x86_64 exited {r.returncode}: {r.stderr.strip()[-800:]}")
        self.bare_pid = int((d / "vmm.pid").read_text())
        deadline = t0 + BOOT_TIMEOUT
        while True:
            probe = subprocess.run([*self.ssh_argv(connect_timeout=5), "true"], capture_output=True, timeout=60)
            if probe.returncode == 0:
                return time.monotonic() - t0
            if not alive(self.bare_pid) or time.monotonic() > deadline:
                tail = (d / "console.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"the bare QEMU guest's sshd never answered on port {self.port}; console:\n{tail}")
            time.sleep(1)

    def ssh_argv(self, *extra: str, connect_timeout: int = 30) -> list[str]:
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.key),
            "-p",
            str(self.port),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            f"ConnectTimeout={connect_timeout}",
            *extra,
            "root@127.0.0.1",
        ]

    def cipher(self) -> str:
        """What ssh negotiates with the guest's sshd (from `ssh -v`)."""
        r = subprocess.run([*self.ssh_argv("-v"), "true"], capture_output=True, text=True, timeout=120)
        m = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", r.stderr)
        if m is None:
            return "?"
        return m.group(1) + ("" if m.group(2) == "<implicit>" else f" + {m.group(2)}")

    def start_master(self) -> list[str]:
        """An ssh ControlMaster connection; the options that make a client use it."""
        ctl = str(self.bare_dir / "ctl.sock")
        self.master = subprocess.Popen(
            [*self.ssh_argv("-M", "-S", ctl, "-N")], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while subprocess.run(["ssh", "-S", ctl, "-O", "check", "root@127.0.0.1"], capture_output=True).returncode != 0:
            if self.master.poll() is not None or time.monotonic() > deadline:
                assert self.master.stderr is not None
                raise RuntimeError(f"the ssh ControlMaster did not come up: {self.master.stderr.read().decode()[-500:]}")
            time.sleep(0.2)
        return ["-S", ctl, "-o", "ControlMaster=no"]

    # --- cleanup ----------------------------------------------------------------------------
    def cleanup(self) -> None:
        if self.master is not None and self.master.poll() is None:
            self.master.kill()
            self.master.wait()
        if self.bare_pid is not None and alive(self.bare_pid):
            kill_pid(self.bare_pid)
        if (self.root / "state").is_dir():
            subprocess.run([str(BANGER), "vm", "delete", VM, "--force"], env=self.env, capture_output=True, timeout=300)
            subprocess.run([str(BANGER), "daemon", "stop"], env=self.env, capture_output=True, timeout=120)
        # whatever the daemon could not stop: VMMs of this banger's VMs, then the daemon
        for pidfile in [*(self.root / "state" / "vms").glob("*/vmm.pid"), self.root / "run" / "bangerd.pid"]:
            try:
                pid = int(pidfile.read_text().strip())
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if str(self.root).encode() in cmd or b"bangerd" in cmd:
                kill_pid(pid)
        time.sleep(0.3)
        shutil.rmtree(self.root, ignore_errors=True)


def latencies(argv: list[str], n: int, env: dict[str, str] | None) -> list[float]:
    """Wall seconds of ``n`` runs of ``argv`` (stdin /dev/null, output discarded)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300
        )
        out.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.decode(errors='replace').strip()[-800:]}")
    return out


def rss_during(bench: Bench, nbytes: int) -> tuple[int, int, int, float, dict[str, float], int]:
    """bangerd's RSS before, its largest sample and the last one after a ``vm exec``
    streaming ``nbytes`` to a host pipe; that exec's wall time and CPU; how many samples."""
    pid = bench.daemon_pid()
    before = statistics.median([RssSampler.read(pid) for _ in range(5)])
    sampler = RssSampler(pid)
    sampler.start()
    try:
        wall, cpu = timed_stream(
            bench.exec_argv("head", "-c", str(nbytes), "/dev/zero"), bench.env, nbytes, {"qemu": bench.vmm_pid(), "bangerd": pid}
        )
    finally:
        sampler.done.set()
        sampler.join()
    time.sleep(0.5)
    after = RssSampler.read(pid)
    if not sampler.samples:
        raise RuntimeError(f"could not sample bangerd (pid {pid})")
    return int(before), max(sampler.samples), after, wall, cpu, len(sampler.samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=None, help="round trips per side (default 50; --quick: 5)")
    ap.add_argument("--bytes", type=parse_size, default=None, help="throughput stream (default 256M; --quick: 16M)")
    ap.add_argument("--rss-bytes", type=parse_size, default=None, help="stream for the daemon RSS (default 1G; --quick: 64M)")
    ap.add_argument("--quick", action="store_true", help="small sizes and counts, for a smoke run")
    ap.add_argument("--vcpu", type=int, default=1, help="vCPUs of both guests (default 1)")
    ap.add_argument("--memory", default="1G", help="memory of both guests (default 1G)")
    args = ap.parse_args(argv)
    calls = args.calls or (5 if args.quick else 50)
    nbytes = args.bytes or parse_size("16M" if args.quick else "256M")
    rss_bytes = args.rss_bytes or parse_size("64M" if args.quick else "1G")

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    root = Path(tempfile.mkdtemp(prefix="bgb-exec-", dir="/tmp"))
    b = Bench(root, args.vcpu, args.memory)
    try:
        # banger's side, alone on the host
        log(f"banger VM ({args.vcpu} vCPU, {args.memory}) ...")
        rootfs, machine = b.create_vm()
        latencies(b.exec_argv("true"), 2, b.env)  # warm: the CLI's caches, the daemon's agent connection
        log(f"vm exec -- true x{calls} ...")
        exec_rt = latencies(b.exec_argv("true"), calls, b.env)
        log(f"vm exec -- head -c {human(nbytes)} ...")
        exec_pids = {"qemu": b.vmm_pid(), "bangerd": b.daemon_pid()}
        exec_tp, exec_cpu = timed_stream(b.exec_argv("head", "-c", str(nbytes), "/dev/zero"), b.env, nbytes, exec_pids)
        log(f"vm exec -- head -c {human(rss_bytes)}, sampling bangerd's RSS ...")
        rss_before, rss_max, rss_after, rss_wall, rss_cpu, rss_n = rss_during(b, rss_bytes)
        log("preparing the bare QEMU guest's disk ...")
        disk = b.prepare_disk(rootfs, machine)
        b.banger("vm", "delete", VM, "--force")

        # ssh's side, alone on the host (banger's VM deleted, its daemon idle)
        log("booting the bare QEMU guest, waiting for its sshd ...")
        boot = b.boot_bare(machine, disk)
        log(f"sshd answered {boot:.1f}s after QEMU started")
        cipher = b.cipher()
        latencies([*b.ssh_argv(), "true"], 2, None)
        log(f"ssh true x{calls} (fresh connections) ...")
        ssh_rt = latencies([*b.ssh_argv(), "true"], calls, None)
        mux = b.start_master()
        latencies([*b.ssh_argv(*mux), "true"], 2, None)
        log(f"ssh true x{calls} (ControlMaster) ...")
        mux_rt = latencies([*b.ssh_argv(*mux), "true"], calls, None)
        log(f"ssh head -c {human(nbytes)} ...")
        assert b.bare_pid is not None
        ssh_tp, ssh_cpu = timed_stream(
            [*b.ssh_argv(), "head", "-c", str(nbytes), "/dev/zero"], None, nbytes, {"qemu": b.bare_pid}
        )
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        err = getattr(exc, "stderr", None)
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
        print(f"exec benchmark failed: {exc}" + (f"\n{err.strip()[-800:]}" if err else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        log("cleaning up ...")
        b.cleanup()

    mib = 1 << 20
    mem = machine["memory_mib"]
    print(
        f"banger vm exec vs ssh, same guest ({IMAGE}, kernel {Path(machine['kernel']).parent.name or machine['kernel']}), "
        f"TCG, {machine['vcpus']} vCPU, {mem} MiB"
    )
    print(
        "measured one after the other (banger's VM first, deleted before the bare QEMU guest booted): "
        "2 host cores, and a second TCG guest would take CPU from the one measured"
    )
    print(f"ssh: OpenSSH to the guest's sshd through QEMU user-net port forwarding, cipher {cipher}\n")

    def ms(v: float) -> str:
        return f"{v * 1000:.0f}"

    print(f"round trip of `true` ({calls} calls each, wall ms of the client process)")
    rt_rows = []
    for what, vals in (
        ("banger vm exec VM -- true", exec_rt),
        ("ssh root@guest true (fresh connection)", ssh_rt),
        ("ssh true over a ControlMaster (multiplexed)", mux_rt),
    ):
        rt_rows.append([what, ms(pct(vals, 50)), ms(pct(vals, 99)), ms(min(vals)), ms(max(vals))])
    print_table(["what", "p50", "p99", "min", "max"], rt_rows)

    def mbps(n: int, s: float) -> float:
        return n / s / 1e6

    print(f"\nstdout throughput: head -c {human(nbytes)} /dev/zero into a host pipe (MB/s = 10^6 B/s)")
    print("CPU seconds meanwhile: the guest's QEMU process (TCG: the guest's own work), bangerd, the client (CLI or ssh)")

    def cpu(c: dict[str, float], k: str) -> str:
        return f"{c[k]:.1f}" if k in c else "-"

    print_table(
        ["what", "seconds", "MB/s", "QEMU cpu", "bangerd cpu", "client cpu"],
        [
            [what, f"{wall:.2f}", f"{mbps(n, wall):.1f}", cpu(c, "qemu"), cpu(c, "bangerd"), cpu(c, "client")]
            for what, n, wall, c in (
                ("banger vm exec", nbytes, exec_tp, exec_cpu),
                ("ssh (fresh connection)", nbytes, ssh_tp, ssh_cpu),
                (f"banger vm exec, {human(rss_bytes)} (the RSS run)", rss_bytes, rss_wall, rss_cpu),
            )
        ],
    )

    print(f"\nbangerd RSS while {human(rss_bytes)} streams through one vm exec (sampled every {RSS_EVERY * 1000:.0f} ms)")
    print_table(
        ["before MiB", "max MiB", "after MiB", "max growth MiB", "samples"],
        [
            [
                f"{rss_before / mib:.1f}",
                f"{rss_max / mib:.1f}",
                f"{rss_after / mib:.1f}",
                f"{(rss_max - rss_before) / mib:.1f}",
                str(rss_n),
            ]
        ],
        left=(),
    )

    rt_ratio = pct(ssh_rt, 50) / pct(exec_rt, 50)
    rt99_ratio = pct(ssh_rt, 99) / pct(exec_rt, 99)
    tp_ratio = ssh_tp / exec_tp  # exec MB/s over ssh MB/s
    growth = (rss_max - rss_before) / mib
    print("\nissue 12 targets")
    print_table(
        ["measure", "value", "target", "met"],
        [
            ["round trip: ssh p50 / exec p50", f"{rt_ratio:.2f}x", f">= {TARGETS['round trip']:.0f}x", _yes(rt_ratio >= 5)],
            ["round trip: ssh p99 / exec p99", f"{rt99_ratio:.2f}x", f">= {TARGETS['round trip']:.0f}x", _yes(rt99_ratio >= 5)],
            [
                "round trip: ssh ControlMaster p50 / exec p50",
                f"{pct(mux_rt, 50) / pct(exec_rt, 50):.2f}x",
                "(reference)",
                "",
            ],
            ["throughput: exec MB/s / ssh MB/s", f"{tp_ratio:.2f}x", ">= 1x", _yes(tp_ratio >= 1)],
            [
                f"daemon RSS growth, {human(rss_bytes)} through one exec",
                f"{growth:.1f} MiB",
                f"<= {TARGETS['rss_mib']:.0f} MiB for 1G",
                _yes(growth <= TARGETS["rss_mib"]) + ("" if rss_bytes == 1 << 30 else " (not 1G)"),
            ],
        ],
        left=(0, 3),
    )
    return 0


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


if __name__ == "__main__":
    sys.exit(main())
