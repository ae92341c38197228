#!/usr/bin/env python3
"""Warm `vm run` against cold, in the same run; resume latency after `vm pause`; and
`vm fork`: its wall time, and the memory its forks take against as many cold VMs.

    cold       banger vm run --rm --cold -- true: create (a boot of the default image),
               wait for the agent, exec `true`, delete
    warm       banger vm run --rm -- true: the same, restored from the warm-start
               template instead of booted (the template is made first, by `image warm`,
               and is not timed)
    resume     vm.pause then vm.resume of one running VM through one client process
               (benchmarks/pause_resume.py's measure), against vm.show
    fork       banger vm fork src --count N --json of a running, cold-booted VM `src`
               (the CLI's wall time; the forks are deleted between runs, untimed),
               against one `vm snapshot src` + one `vm restore` of that snapshot (what
               a single restore costs) and against `vm create` (a cold boot, the
               agent answering)
    memory     PSS (/proc/<QEMU pid>/smaps_rollup: Pss, and its Anon / File / Shmem
               parts) of the N forks of the last fork run, 10 s after a `vm exec --
               true` in each; against N cold VMs (`vm create`, one after another) the
               same 10 s after their `vm exec -- true`, measured once the forks and
               src are gone. src's own PSS is reported beside its forks'.

Cold and warm rounds interleave so drift hits both alike; the CLI's wall time and its
per-stage split (create / exec / delete) are reported. Fresh config/state/runtime/guest
memory dirs with [vmm] accel = 'tcg' (and tcg_tb_size_mib = --tb-size when not 0:
QEMU's -accel tcg,tb-size=, the translation cache each VM may grow to; 0 leaves QEMU's
default, up to 1 GiB); the cache is shared with the test suite. Targets: warm >= 10x
faster than cold and <= 1 s, resume <= 50 ms (issue 13); vm fork --count 4 <= 2 s and
the summed PSS of 4 forks <= 2x one cold VM's (issue 18). Nothing is asserted.

    .venv/bin/python benchmarks/warm_start.py [--runs 3] [--rounds 20] [--only warm|fork]
        [--fork-runs 3] [--forks 4] [--tb-size MIB]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from banger_core.paths import Paths
from pause_resume import VM, measure, report
from report import TEST_CACHE, banger_env, print_table
from vm_run import RAN_RE

BANGER = Path(sys.executable).parent / "banger"
SPEC = ["--vcpu", "1", "--memory", "1G"]
SRC = "src"  # the VM the fork part forks
PSS_KEYS = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")
SETTLE_S = 10  # after `vm exec -- true`, before PSS is read


def banger(env: dict[str, str], *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(BANGER), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"banger {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-800:]}")
    return r


def timed(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    r = banger(env, *args)
    return time.monotonic() - t0, r


def run(env: dict[str, str], *extra: str) -> tuple[float, dict[str, float], str]:
    t0 = time.monotonic()
    r = banger(env, "vm", "run", "--rm", *SPEC, *extra, "--", "true")
    wall = time.monotonic() - t0
    m = RAN_RE.search(r.stderr.strip().splitlines()[-1])
    stages = {k: float(v.rstrip("s")) for k, v in (p.split() for p in m.group(2).split(", "))} if m else {}
    how = next((ln.rsplit("| ", 1)[-1] for ln in r.stderr.splitlines() if ln.startswith("spec:")), "?")
    return wall, stages, how


def pss(pid: int) -> dict[str, int]:
    """PSS and its parts (kB) of one process, from /proc/PID/smaps_rollup (a part the
    kernel does not report is left out)."""
    out = {}
    for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = ln.partition(":")
        if key in PSS_KEYS:
            out[key] = int(rest.split()[0])
    return out


def accel_arg(pid: int) -> str:
    """The -accel argument QEMU PID was started with."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return argv[argv.index("-accel") + 1] if "-accel" in argv else "?"


def settle_and_measure(env: dict[str, str], vms: dict[str, int]) -> dict[str, dict[str, int]]:
    """`vm exec NAME -- true` in each VM, SETTLE_S s, then each one's PSS."""
    for name in vms:
        banger(env, "vm", "exec", name, "--", "true")
    time.sleep(SETTLE_S)
    return {name: pss(pid) for name, pid in vms.items()}


def fork_part(env: dict[str, str], fork_runs: int, forks: int) -> dict:
    """The fork part's measurements (see the docstring); what it made is deleted as it
    goes (the caller's cleanup catches the rest)."""
    res: dict = {"create": [], "fork": [], "fork_delete": []}
    wall, r = timed(env, "vm", "create", "--name", SRC, *SPEC, "--json")
    res["create"].append(wall)
    src_pid = json.loads(r.stdout)["pid"]
    res["accel"] = accel_arg(src_pid)
    banger(env, "vm", "exec", SRC, "--", "true")
    print(f"{SRC} booted cold in {wall:.1f}s (-accel {res['accel']})", file=sys.stderr)

    res["snapshot"], _ = timed(env, "vm", "snapshot", SRC, "--name", "base", "--json")
    res["restore"], _ = timed(env, "vm", "restore", "base", "--name", "restored", "--json")
    banger(env, "vm", "delete", "restored", "--force")
    banger(env, "snapshot", "delete", "base")
    print(f"baseline: vm snapshot {res['snapshot']:.2f}s, vm restore {res['restore']:.2f}s", file=sys.stderr)

    made: dict[str, int] = {}
    for i in range(1, fork_runs + 1):
        wall, r = timed(env, "vm", "fork", SRC, "--count", str(forks), "--name", f"f{i}", "--json")
        res["fork"].append(wall)
        made = {v["name"]: v["pid"] for v in json.loads(r.stdout)["vms"]}
        print(f"fork run {i}: {len(made)} forks in {wall:.2f}s", file=sys.stderr)
        if i < fork_runs:
            t, _ = timed(env, "vm", "delete", *made, "--force")
            res["fork_delete"].append(t)
    res["fork_pss"] = settle_and_measure(env, {**made, SRC: src_pid})
    res["src_pss"] = res["fork_pss"].pop(SRC)
    banger(env, "vm", "delete", *made, SRC, "--force")

    cold: dict[str, int] = {}
    for k in range(1, forks + 1):
        wall, r = timed(env, "vm", "create", "--name", f"cold{k}", *SPEC, "--json")
        res["create"].append(wall)
        cold[f"cold{k}"] = json.loads(r.stdout)["pid"]
        print(f"cold{k} booted in {wall:.1f}s", file=sys.stderr)
    res["cold_pss"] = settle_and_measure(env, cold)
    banger(env, "vm", "delete", *cold, "--force")
    return res


def report_fork(res: dict, fork_runs: int, forks: int, tb_size: int) -> None:
    tb = f"tcg_tb_size_mib = {tb_size}" if tb_size else "QEMU's default (tcg_tb_size_mib = 0)"
    print(f"translation cache: {tb}; QEMU ran with -accel {res['accel']}")
    one = res["snapshot"] + res["restore"]
    fmed = statistics.median(res["fork"])
    cmed = statistics.median(res["create"])
    rows = [
        [
            f"vm fork --count {forks}",
            f"{fmed:.2f}",
            f"{min(res['fork']):.2f}",
            f"{max(res['fork']):.2f}",
            f"{fmed / one:.2f}",
            f"{fmed / cmed:.3f}",
        ],
        ["  per fork", f"{fmed / forks:.2f}", "", "", f"{fmed / forks / one:.2f}", f"{fmed / forks / cmed:.3f}"],
        ["vm snapshot + vm restore", f"{one:.2f}", "", "", "1.00", f"{one / cmed:.3f}"],
        ["  vm snapshot", f"{res['snapshot']:.2f}", "", "", "", ""],
        ["  vm restore", f"{res['restore']:.2f}", "", "", "", ""],
        [
            f"vm create (cold boot, {len(res['create'])}x)",
            f"{cmed:.2f}",
            f"{min(res['create']):.2f}",
            f"{max(res['create']):.2f}",
            f"{cmed / one:.2f}",
            "1.000",
        ],
    ]
    if res["fork_delete"]:
        d = res["fork_delete"]
        rows.append([f"vm delete of {forks} forks", f"{statistics.median(d):.2f}", f"{min(d):.2f}", f"{max(d):.2f}", "", ""])
    print(f"vm fork ({fork_runs} runs; TCG, 1 vCPU, 1 GiB, seconds)")
    print_table(["what", "median", "min", "max", "x snapshot+restore", "x cold create"], rows)
    print(f"target: vm fork --count {forks} <= 2 s: {fmed:.2f}s ({'met' if fmed <= 2 else 'NOT met'})")
    print()

    def mib(kb: int) -> str:
        return f"{kb / 1024:.0f}"

    def total(group: dict[str, dict[str, int]]) -> dict[str, int]:
        return {k: sum(p.get(k, 0) for p in group.values()) for k in PSS_KEYS}

    keys = [k for k in PSS_KEYS if any(k in p for p in [res["src_pss"], *res["fork_pss"].values(), *res["cold_pss"].values()])]
    fsum, csum = total(res["fork_pss"]), total(res["cold_pss"])
    cmean = {k: v / forks for k, v in csum.items()}
    rows = [[name, *(mib(p.get(k, 0)) for k in keys)] for name, p in res["fork_pss"].items()]
    rows.append([f"sum of {forks} forks", *(mib(fsum[k]) for k in keys)])
    rows.append([f"{SRC} (forked VM)", *(mib(res["src_pss"].get(k, 0)) for k in keys)])
    rows += [[name, *(mib(p.get(k, 0)) for k in keys)] for name, p in res["cold_pss"].items()]
    rows.append([f"sum of {forks} cold", *(mib(csum[k]) for k in keys)])
    rows.append(["mean of one cold", *(mib(int(cmean[k])) for k in keys)])
    print(f"memory: PSS {SETTLE_S} s after vm exec -- true (MiB; TCG, 1 vCPU, 1 GiB)")
    print_table(["VM", *keys], rows)
    per_cold = fsum["Pss"] / cmean["Pss"]
    print(
        f"sum of {forks} forks / one cold: {per_cold:.2f}x; / sum of {forks} cold: {fsum['Pss'] / csum['Pss']:.2f}x; "
        f"target <= 2x one cold: {'met' if per_cold <= 2 else 'NOT met'}"
    )


def report_warm(results: dict[str, list[tuple[float, dict[str, float]]]], runs: int) -> None:
    med = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    rows = []
    for kind in ("cold", "warm"):
        walls = [w for w, _ in results[kind]]
        rows.append(
            [
                f"vm run --rm -- true ({kind})",
                f"{med[kind]:.2f}",
                f"{min(walls):.2f}",
                f"{max(walls):.2f}",
                f"{med['cold'] / med[kind]:.1f}",
            ]
        )
        for stage in ("create", "exec", "delete"):
            vals = [s[stage] for _, s in results[kind] if stage in s]
            if vals:
                rows.append([f"  stage {stage}", f"{statistics.median(vals):.2f}", f"{min(vals):.2f}", f"{max(vals):.2f}", ""])
    print(f"warm vs cold vm run ({runs} runs each, TCG, 1 vCPU, 1 GiB, seconds; ratio = cold / this)")
    print_table(["what", "median", "min", "max", "x faster than cold"], rows)
    speedup = med["cold"] / med["warm"]
    print(
        f"targets: warm >= 10x cold: {speedup:.1f}x ({'met' if speedup >= 10 else 'NOT met'}); "
        f"warm <= 1 s: {med['warm']:.2f}s ({'met' if med['warm'] <= 1 else 'NOT met'})"
    )


def cleanup(env: dict[str, str]) -> None:
    """Delete every VM and snapshot this banger has (its own dirs: nothing else's)."""

    def names(*args: str) -> list[str]:
        r = subprocess.run([str(BANGER), *args], env=env, capture_output=True, text=True, timeout=120)
        try:
            data = json.loads(r.stdout)
        except ValueError:
            return []
        items = data["vms"] if isinstance(data, dict) else data
        return [x["name"] for x in items]

    vms = names("vm", "list", "--json")
    if vms:
        subprocess.run([str(BANGER), "vm", "delete", *vms, "--force"], env=env, capture_output=True, timeout=600)
    snaps = names("snapshot", "list", "--json")
    if snaps:
        subprocess.run([str(BANGER), "snapshot", "delete", *snaps], env=env, capture_output=True, timeout=300)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="cold and warm runs each")
    ap.add_argument("--rounds", type=int, default=20, help="pause/resume rounds")
    ap.add_argument("--only", choices=("warm", "fork"), help="warm: warm/cold runs and resume alone; fork: the fork part alone")
    ap.add_argument("--fork-runs", type=int, default=3, help="timed vm fork runs")
    ap.add_argument("--forks", type=int, default=4, help="forks per run, and cold VMs to compare their memory with")
    ap.add_argument("--tb-size", type=int, default=0, metavar="MIB", help="[vmm] tcg_tb_size_mib (0: QEMU's default)")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bgw-", dir="/tmp"))
    memory = Path("/dev/shm") / root.name
    env = banger_env(root, cache=TEST_CACHE)
    env["BANGER_MEMORY_DIR"] = str(memory)
    (root / "cfg").mkdir()
    config = "[vmm]\naccel = 'tcg'\n" + (f"tcg_tb_size_mib = {args.tb_size}\n" if args.tb_size else "")
    (root / "cfg" / "config.toml").write_text(config)
    results: dict[str, list[tuple[float, dict[str, float]]]] = {"cold": [], "warm": []}
    times: dict[str, list[float]] = {}
    fork: dict = {}
    try:
        banger(env, "image", "pull", "debian-bookworm")
        if args.only != "fork":
            t0 = time.monotonic()
            banger(env, "image", "warm", *SPEC)
            print(f"template made in {time.monotonic() - t0:.1f}s (a boot, then the snapshot)", file=sys.stderr)
            for i in range(args.runs):
                for kind, extra in (("cold", ("--cold",)), ("warm", ())):
                    wall, stages, how = run(env, *extra)
                    if not how.startswith(kind):
                        raise RuntimeError(f"a {kind} run said it started {how!r}")
                    results[kind].append((wall, stages))
                    print(f"round {i + 1}: {kind} {wall:.2f}s {stages} ({how})", file=sys.stderr)
            banger(env, "vm", "run", "-d", "--name", VM, *SPEC)
            times = measure(Paths.from_env(env), args.rounds)
            banger(env, "vm", "delete", VM, "--force")
        if args.only != "warm":
            fork = fork_part(env, args.fork_runs, args.forks)
    finally:
        cleanup(env)
        subprocess.run([str(BANGER), "daemon", "stop"], env=env, capture_output=True, timeout=120)
        subprocess.run(["pkill", "-9", "-f", str(root)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(memory, ignore_errors=True)

    if args.only != "fork":
        report_warm(results, args.runs)
        print()
        report(times, args.rounds)
    if args.only != "warm":
        if args.only != "fork":
            print()
        report_fork(fork, args.fork_runs, args.forks, args.tb_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
