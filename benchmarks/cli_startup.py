#!/usr/bin/env python3
"""Wall time of banger's CLI start-up, against `python -c pass` on the same interpreter.

Measures the installed console script next to ``sys.executable``:

    banger --version        (the fast path: no typer, pydantic or pluggy)
    banger plugins list     (config + every enabled plugin loaded)
    banger doctor           (all of the above plus every check; starts no daemon)
    banger vm list          (the common path: one RPC to a daemon already running; its
                             warm-up run starts the daemon)
    banger vm bench-ping    (a plugin's `vm` subcommand making the same RPC: the plugin,
                             written here by hand like pip would install it, is the only
                             one the CLI imports for it)

Each command gets one warm-up run; then ``--runs`` rounds run every command once per
round (interleaved, so drift on the machine affects all of them alike). Prints
min/median/p90 in ms and each median's ratio to the baseline median.

Config, state, cache and runtime dirs are fresh temp dirs, and ``BANGER_*`` variables
from the caller's environment are dropped, so the numbers are for a default config
and the user's own state is never touched. Any daemon is stopped at the end.
PYTHONDONTWRITEBYTECODE is dropped (bytecode goes to a temp PYTHONPYCACHEPREFIX):
without cached bytecode every run would compile banger's modules again, which no
installed banger does.

Stdlib only:  .venv/bin/python benchmarks/cli_startup.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import print_table

BASELINE = "python -c pass"


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in [0, 100])."""
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def make_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(
        # Bytecode is cached as on any install (the warm-up run writes it), but under
        # the temp dir: an editable checkout's tree is left as it was.
        PYTHONPYCACHEPREFIX=str(root / "pycache"),
        BANGER_CONFIG_DIR=str(root / "cfg"),
        BANGER_STATE_DIR=str(root / "state"),
        BANGER_CACHE_DIR=str(root / "cache"),
        BANGER_RUNTIME_DIR=str(root / "run"),
        NO_COLOR="1",
        BANGER_NETNS="none",  # changes no network namespace
    )
    return env


# A plugin adding a `vm` subcommand (no settings, imports kept inside the command).
PLUGIN = """
from banger_core import hookimpl


@hookimpl
def register_commands(vm):
    @vm.command("bench-ping")
    def bench_ping() -> None:
        \"\"\"One vm.list RPC, from a plugin's vm subcommand.\"\"\"
        from banger_core.client import Client

        print(len(Client().call("vm.list")))
"""


def install_plugin(target: Path) -> None:
    """What pip leaves on disk for a one-module wheel with a banger.plugins entry point."""
    target.mkdir(parents=True)
    (target / "banger_bench_ping.py").write_text(PLUGIN)
    info = target / "banger_bench_ping-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: banger-bench-ping\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[banger.plugins]\nbench-ping = banger_bench_ping\n")
    (info / "RECORD").write_text("")


def time_once(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall time in ms of one run, and its exit status."""
    t0 = time.perf_counter_ns()
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter_ns() - t0) / 1e6, proc.returncode


def stop_daemon(banger: Path, env: dict[str, str]) -> str:
    try:
        proc = subprocess.run([str(banger), "daemon", "stop"], env=env, capture_output=True, text=True, timeout=90)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"banger daemon stop failed: {exc}"
    return (proc.stdout or proc.stderr).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="measured runs per command (default: 20)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    python = Path(sys.executable)
    banger = python.parent / "banger"
    if not (banger.is_file() and os.access(banger, os.X_OK)):
        print(f"cli_startup: no banger console script at {banger}; run with the venv's python", file=sys.stderr)
        return 2

    commands: dict[str, list[str]] = {
        BASELINE: [str(python), "-c", "pass"],
        "banger --version": [str(banger), "--version"],
        "banger plugins list": [str(banger), "plugins", "list"],
        "banger doctor": [str(banger), "doctor"],
        "banger vm list": [str(banger), "vm", "list"],
        "banger vm bench-ping": [str(banger), "vm", "bench-ping"],
    }

    # Short path under /tmp: the daemon's Unix socket path is limited to 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="bgbench-", dir="/tmp" if os.path.isdir("/tmp") else None))
    env = make_env(root)
    install_plugin(root / "plugin")
    env["PYTHONPATH"] = str(root / "plugin")
    samples: dict[str, list[float]] = {name: [] for name in commands}
    codes: dict[str, set[int]] = {name: set() for name in commands}
    daemon_stop = ""
    try:
        for name, cmd in commands.items():  # warm-up: page cache, .pyc files, state db
            _, rc = time_once(cmd, env)
            codes[name].add(rc)
        for _ in range(args.runs):
            for name, cmd in commands.items():
                ms, rc = time_once(cmd, env)
                samples[name].append(ms)
                codes[name].add(rc)
    except KeyboardInterrupt:
        print("cli_startup: interrupted", file=sys.stderr)
        return 130
    finally:
        daemon_stop = stop_daemon(banger, env)
        shutil.rmtree(root, ignore_errors=True)

    base = statistics.median(samples[BASELINE])
    results = []
    for name, values in samples.items():
        med = statistics.median(values)
        results.append(
            {
                "command": name,
                "runs": len(values),
                "min_ms": round(min(values), 2),
                "median_ms": round(med, 2),
                "p90_ms": round(percentile(values, 90), 2),
                "ratio": round(med / base, 2),
                "exit_codes": sorted(codes[name]),
            }
        )

    meta = {
        "python": f"{platform.python_implementation()} {platform.python_version()} ({python})",
        "banger": str(banger),
        "platform": platform.platform(),
        "runs": args.runs,
        "daemon_stop": daemon_stop,
    }
    if args.json:
        print(json.dumps({"meta": meta, "baseline": BASELINE, "results": results}, indent=2))
        return 0

    print(f"python:   {meta['python']}")
    print(f"banger:   {meta['banger']}")
    print(f"platform: {meta['platform']}")
    print(f"runs:     {args.runs} per command (+1 warm-up), interleaved; baseline: {BASELINE}\n")
    header = ["command", "min ms", "median ms", "p90 ms", "x baseline"]
    rows = [
        [r["command"], f"{r['min_ms']:.1f}", f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['ratio']:.2f}"] for r in results
    ]
    print_table(header, rows)
    for r in results:
        if r["exit_codes"] != [0]:
            print(f"note: {r['command']} exited with {', '.join(map(str, r['exit_codes']))}")
    print(f"\ndaemon at exit: {daemon_stop}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
