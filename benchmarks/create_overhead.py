#!/usr/bin/env python3
"""What `banger vm create` adds on top of booting the same guest with a bare QEMU command.

Guest: the cached test kernel + initrd + busybox root disk (tests/guest_assets.py),
which prints ``BANGER-TEST-BOOT`` on its serial console once booted.  Each round runs

    baseline   qemu-system-x86_64 as banger runs it (-M pc -accel tcg -cpu max -smp 1
               -m 256M, virtio-blk root on a qcow2 overlay of the cached rootfs,
               -serial file:, same -append minus banger.*), foreground, then killed
    banger     banger vm create --vcpu 1 --memory 256M --root-size 256M, then
               vm delete --force

and reports seconds from process start until the BOOT marker is in the console log,
create's CLI wall time and its stages (the CLI prints them at 0.1 s resolution).
Rounds interleave baseline and banger so drift on the machine hits both alike.
Then ``--parallel`` creates start at once, against the serial creates above.

Config, state, cache and runtime dirs are fresh temp dirs with ``[vmm] accel='tcg'``;
everything started is stopped and removed at the end, also on error or Ctrl-C.

    .venv/bin/python benchmarks/create_overhead.py [--runs N] [--parallel N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import guest_assets as ga
from leftovers import kill_processes_using

from report import banger_env, print_table

BOOT_TIMEOUT = 300.0
POLL = 0.05
STAGES = ("reserve", "prepare_host", "boot", "wait_agent", "ready")
STAGE_RE = re.compile(r"^\[\s*([\d.]+)s\] (\w+)$", re.M)
APPEND = "console=ttyS0 root=/dev/vda rw panic=-1 net.ifnames=0"  # banger's, minus banger.vm=
BANGER = Path(sys.executable).parent / "banger"


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = banger_env(root)
        (root / "cfg").mkdir(parents=True)
        (root / "cfg" / "config.toml").write_text("[vmm]\naccel = 'tcg'\n")
        self.bare: list[subprocess.Popen[bytes]] = []

    def banger(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(BANGER), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"banger {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    # --- baseline -------------------------------------------------------------------
    def baseline(self, kernel: dict[str, str], rootfs: Path, i: int) -> float:
        d = self.root / f"bare{i}"
        d.mkdir()
        disk, console = d / "root.qcow2", d / "console.log"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(rootfs), str(disk), "256M"], check=True)
        argv = [
            "qemu-system-x86_64",
            "-M",
            "pc",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "256M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            kernel["kernel"],
            "-initrd",
            kernel["initrd"],
            "-append",
            APPEND,
            "-serial",
            f"file:{console}",
            "-drive",
            f"id=root,file={disk},format=qcow2,if=none,cache=writeback,discard=unmap",
            "-device",
            "virtio-blk-pci,drive=root",
        ]
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.bare.append(p)
        try:
            while time.monotonic() - t0 < BOOT_TIMEOUT:
                if console.exists() and ga.BOOT_MARKER.encode() in console.read_bytes():
                    return time.monotonic() - t0
                if p.poll() is not None:
                    raise RuntimeError(f"bare qemu exited {p.returncode}: {p.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
                time.sleep(POLL)
            raise RuntimeError(f"bare qemu: no {ga.BOOT_MARKER} in {BOOT_TIMEOUT:.0f}s")
        finally:
            p.kill()
            p.wait()
            shutil.rmtree(d, ignore_errors=True)

    # --- banger ---------------------------------------------------------------------
    def creates(self, names: list[str]) -> dict[str, dict[str, float]]:
        """Start one `vm create` per name at once; per name: CLI wall, time to BOOT marker, stages."""
        argv = [str(BANGER), "vm", "create", "--image", "bb", "--vcpu", "1", "--memory", "256M", "--root-size", "256M"]
        t0 = time.monotonic()
        procs = {
            n: subprocess.Popen(
                [*argv, "--name", n],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in names
        }
        res: dict[str, dict[str, float]] = {n: {} for n in names}
        try:
            self._watch(procs, res, t0)
        finally:  # on error: no create CLI outlives this call (cleanup() deletes its VMs)
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return res

    def _watch(self, procs: dict[str, subprocess.Popen[str]], res: dict[str, dict[str, float]], t0: float) -> None:
        names = list(procs)
        while any("marker" not in r for r in res.values()):
            now = time.monotonic()
            if now - t0 > BOOT_TIMEOUT:
                raise RuntimeError(f"vm create: no {ga.BOOT_MARKER} in {BOOT_TIMEOUT:.0f}s for some of {names}")
            for n, p in procs.items():
                if "cli" not in res[n] and p.poll() is not None:
                    res[n]["cli"] = now - t0
                    _, err = p.communicate()
                    if p.returncode != 0:
                        raise RuntimeError(f"vm create {n} exited {p.returncode}: {err.strip()}")
                    stamps = [(s, float(t)) for t, s in STAGE_RE.findall(err)]
                    for (s, t), (_, t_next) in zip(stamps, stamps[1:], strict=False):
                        res[n][f"stage {s}"] = t_next - t
                    res[n].update({f"stage {s}": t for s, t in stamps if s == "ready"})
            # each VM's console is state/vms/<id>/console.log; the kernel command line names the VM
            for log in (self.root / "state" / "vms").glob("*/console.log"):
                text = log.read_text(errors="replace")
                for n in names:
                    if "marker" not in res[n] and ga.BOOT_MARKER in text and re.search(rf"banger\.vm={n}\b", text):
                        res[n]["marker"] = time.monotonic() - t0
            time.sleep(POLL)
        for n, p in procs.items():  # a marker before the CLI returned: wait for the CLI too
            if "cli" not in res[n]:
                p.wait(BOOT_TIMEOUT)
                res[n]["cli"] = time.monotonic() - t0
                if p.returncode != 0:
                    raise RuntimeError(f"vm create {n} exited {p.returncode}: {p.communicate()[1].strip()}")

    def cleanup(self) -> list[str]:
        notes: list[str] = []
        for p in self.bare:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            names = [v["name"] for v in json.loads(self.banger("vm", "list", "--json").stdout)]
            if names:
                self.banger("vm", "delete", "--force", *names, timeout=180)
                notes.append(f"deleted left-over VMs {names}")
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            notes.append(f"vm cleanup failed: {exc}")
        try:
            notes.append(self.banger("daemon", "stop", timeout=90).stdout.strip())
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            notes.append(f"daemon stop failed: {exc}")
        notes += [f"killed left-over process: {cmd}" for cmd in kill_processes_using(self.root)]
        return notes

    def daemon_starts(self) -> int:
        log = self.root / "state" / "bangerd.log"
        return log.read_text().count(" listening on ") if log.exists() else 0


def row(metric: str, vals: list[float], ref: float | None = None, vs: str = "") -> dict[str, object]:
    med = statistics.median(vals)
    return {
        "metric": metric,
        "n": len(vals),
        "min_s": round(min(vals), 3),
        "median_s": round(med, 3),
        "max_s": round(max(vals), 3),
        "ratio": round(med / ref, 2) if ref else None,
        "vs": vs if ref else "",
    }


def on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # same clean-up path as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds of baseline + create, and of parallel (default 3)")
    parser.add_argument("--parallel", type=int, default=2, help="concurrent creates (default 2)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.parallel < 1:
        parser.error("--runs and --parallel must be at least 1")
    if not os.access(BANGER, os.X_OK):
        print(f"create_overhead: no banger at {BANGER}; run with the venv's python", file=sys.stderr)
        return 2
    cache = ga.default_cache_dir()
    kernel = ga.test_kernel(cache)
    rootfs = cache / "rootfs-busybox.ext4"
    if not rootfs.exists():
        ga.busybox_rootfs(rootfs, modules_dir=Path(kernel["modules"]), cache=cache)

    signal.signal(signal.SIGTERM, on_sigterm)
    # Short path under /tmp: the daemon's Unix socket path is limited to 108 bytes.
    bench = Bench(Path(tempfile.mkdtemp(prefix="bgco-", dir="/tmp")))
    bare: list[float] = []
    single: list[dict[str, float]] = []
    par_cli: list[float] = []
    par_marker: list[float] = []
    deletes: list[float] = []
    try:
        bench.banger("kernel", "import", "dc", "--from", str(Path(kernel["kernel"]).parent))
        bench.banger("image", "register", "bb", "--rootfs", str(rootfs), "--kernel-ref", "dc")
        for i in range(args.runs):
            bare.append(bench.baseline(kernel, rootfs, i))
            single.append(bench.creates([f"s{i}"])[f"s{i}"])
            t = time.monotonic()
            bench.banger("vm", "delete", "--force", f"s{i}", timeout=180)
            deletes.append(time.monotonic() - t)
        for i in range(args.runs):
            names = [f"p{i}-{j}" for j in range(args.parallel)]
            res = bench.creates(names)
            par_cli.append(max(r["cli"] for r in res.values()))
            par_marker.append(max(r["marker"] for r in res.values()))
            bench.banger("vm", "delete", "--force", *names, timeout=180)
    except KeyboardInterrupt:
        print("create_overhead: interrupted", file=sys.stderr)
        return 130
    finally:
        daemon_starts = bench.daemon_starts()
        notes = bench.cleanup()
        shutil.rmtree(bench.root, ignore_errors=True)

    base = statistics.median(bare)
    cli = [r["cli"] for r in single]
    mark = [r["marker"] for r in single]
    results = [
        row("baseline: bare qemu, start -> BOOT marker", bare, base, "baseline"),
        row("banger: vm create -> BOOT marker", mark, base, "baseline"),
        row("banger overhead (marker - baseline, per round)", [m - b for m, b in zip(mark, bare, strict=False)]),
        row("banger: vm create CLI wall", cli, base, "baseline"),
    ]
    results += [row(f"  {k}", [r[k] for r in single]) for k in (f"stage {s}" for s in STAGES) if all(k in r for r in single)]
    results += [
        row("banger: vm delete --force CLI wall", deletes),
        row(f"parallel x{args.parallel}: all create CLIs returned", par_cli, statistics.median(cli), "single create CLI"),
        row(f"parallel x{args.parallel}: all BOOT markers", par_marker, statistics.median(mark), "single create marker"),
    ]
    meta = {
        "runs": args.runs,
        "parallel": args.parallel,
        "kernel": kernel["kernel"],
        "rootfs": str(rootfs),
        "daemon_starts": daemon_starts,
        "cleanup": notes,
        "loadavg": os.getloadavg(),
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return 0
    print(f"guest:    {kernel['kernel']} + initrd, {rootfs} (qcow2 overlay), 1 vcpu, 256M, TCG")
    print(f"rounds:   {args.runs} (baseline and banger interleaved), parallel x{args.parallel}; stages at 0.1 s resolution")
    print("stage rows: time to the next stage; 'ready' is the CLI-side time at which ready was printed\n")
    header = ["metric", "n", "min s", "median s", "max s", "ratio", "vs"]
    rows = [
        [
            str(r["metric"]),
            str(r["n"]),
            f"{r['min_s']:.2f}",
            f"{r['median_s']:.2f}",
            f"{r['max_s']:.2f}",
            f"{r['ratio']:.2f}" if r["ratio"] is not None else "",
            str(r["vs"]),
        ]
        for r in results
    ]
    print_table(header, rows, left=(0, 6))
    print(
        f"\nbanger overhead, median of medians: {statistics.median(mark) - base:+.2f} s;"
        f" daemon started {daemon_starts}x; load avg at end {meta['loadavg'][0]:.2f}"
    )
    print("cleanup: " + "; ".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
