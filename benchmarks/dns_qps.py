#!/usr/bin/env python3
"""banger's DNS server against dnsmasq serving the same records, loaded by dnsperf.

banger's server is the dns plugin's service class (``banger_dns.server.DnsService``)
run standalone in a subprocess of this script (``--serve``), with a static "net"
service of ``--records`` names (``box00.vm`` ...): no daemon, so nothing else in
bangerd shares its process. dnsmasq serves the same names
(``--host-record``s; ``--local=/vm/``: unknown names in vm are NXDOMAIN, nothing is forwarded). Both
listen on free 127.0.0.1 ports and run one at a time.

The query file mixes existing names (90%) and NXDOMAIN names (10%). Two phases per
server, interleaved (banger, dnsmasq, banger, dnsmasq):

    latency      dnsperf -Q RATE -l SECONDS -v: every query's latency, from which
                 p50/p99/max (this dnsperf prints only average and stddev itself)
    saturation   dnsperf -c 4 -q 100 -l SECONDS: queries per second, as many as
                 the server answers

Prints a table with each banger number's ratio to dnsmasq's, and the targets:
banger p99 < 1 ms at 2000 qps, banger saturation >= 0.2x dnsmasq.

Needs dnsperf and dnsmasq (apt install dnsperf dnsmasq-base) and the dns plugin
installed in this interpreter:

    .venv/bin/python benchmarks/dns_qps.py [--seconds 10] [--rate 2000] [--records 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import print_table

SUBNET = "172.30.0."
NX_SHARE = 0.1
QUERIES_IN_FILE = 1000
P99_TARGET_MS = 1.0
SATURATION_TARGET = 0.2


def names(count: int) -> dict[str, str]:
    return {f"box{i:02d}": f"{SUBNET}{i + 2}" for i in range(count)}


def free_port() -> int:
    """A loopback port free for both UDP and TCP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free loopback port")


# --- banger's server, standalone ------------------------------------------------------------
def serve(port: int, count: int) -> int:
    """Run the dns plugin's service with a static record set until stdin closes."""
    from banger_dns import Settings
    from banger_dns.server import DnsService

    class StaticNet:
        generation = 1

        def records(self) -> dict[str, str]:
            return names(count)

    svc = DnsService(lambda: Settings(port=port), StaticNet)
    svc.start()
    print(f"ready {svc.port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        sys.stdin.read()
    finally:
        svc.stop()
        print(json.dumps(svc.status()), flush=True)
    return 0


def start_banger(port: int, count: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--records", str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"banger's DNS server did not start: {line!r}")
    return proc


def start_dnsmasq(port: int, count: int, log: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--pid-file=",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--local=/vm/",
            # the records on the command line: run as root, dnsmasq reads files as nobody
            *(f"--host-record={name}.vm,{addr}" for name, addr in names(count).items()),
            "--log-facility=-",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc


def wait_answering(port: int, proc: subprocess.Popen[str], what: str) -> None:
    """Until a query for box00.vm gets a NOERROR answer (a hand-made packet: stdlib only)."""
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05box00\x02vm\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + 10
    last = "nothing"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            s.sendto(query, ("127.0.0.1", port))
            try:
                data = s.recv(512)
            except TimeoutError:
                continue
        if data[:2] == b"\x12\x34" and data[3] & 0x0F == 0 and data[6:8] == b"\x00\x01":
            return
        last = data.hex()  # e.g. dnsmasq answering before it read its hosts file
        time.sleep(0.1)
    raise RuntimeError(f"{what} does not answer box00.vm A on 127.0.0.1:{port} (last reply: {last})")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        if proc.stdin:
            proc.stdin.close()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- dnsperf ----------------------------------------------------------------------------------
def query_file(path: Path, count: int) -> None:
    rng = random.Random(1)
    known = list(names(count))
    lines = []
    for i in range(QUERIES_IN_FILE):
        if rng.random() < NX_SHARE:
            lines.append(f"nosuch{i % 100}.vm A")
        else:
            lines.append(f"{rng.choice(known)}.vm A")
    path.write_text("\n".join(lines) + "\n")


def dnsperf(port: int, qfile: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    argv = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(qfile), *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout[-500:]}")
    return proc


def stat(out: str, label: str) -> float:
    m = re.search(rf"{re.escape(label)}:\s+([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"dnsperf printed no {label!r}:\n{out[-1500:]}")
    return float(m.group(1))


def percentile(values: list[float], q: float) -> float:
    """Nearest rank (q in [0, 100])."""
    data = sorted(values)
    return data[min(len(data) - 1, max(0, int(round(q / 100 * len(data) + 0.5)) - 1))]


def latency_run(port: int, qfile: Path, rate: int, seconds: float) -> dict[str, float]:
    out = dnsperf(port, qfile, ["-Q", str(rate), "-l", str(seconds), "-v"]).stdout
    lat = [float(m.group(2)) * 1000 for m in re.finditer(r"^> (\S+) \S+ \S+ ([0-9.]+)$", out, re.M)]
    codes = re.findall(r"^> (\S+) ", out, re.M)
    if not lat:
        raise RuntimeError(f"dnsperf -v reported no queries:\n{out[-1500:]}")
    return {
        "queries": len(lat),
        "lost": stat(out, "Queries lost"),
        "nxdomain_share": round(codes.count("NXDOMAIN") / len(codes), 3),
        "avg_ms": sum(lat) / len(lat),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat),
    }


def saturation_run(port: int, qfile: Path, seconds: float) -> dict[str, float]:
    out = dnsperf(port, qfile, ["-c", "4", "-q", "100", "-l", str(seconds)]).stdout
    return {
        "qps": stat(out, "Queries per second"),
        "lost": stat(out, "Queries lost"),
        "avg_ms": stat(out, "Average Latency (s)") * 1000,
    }


def version(argv: list[str], pattern: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    m = re.search(pattern, proc.stdout + proc.stderr)
    return m.group(1) if m else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of each dnsperf run (default: 10)")
    parser.add_argument("--rate", type=int, default=2000, help="queries per second of the latency phase (default: 2000)")
    parser.add_argument("--records", type=int, default=50, help="names in the zone (default: 50)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the banger server subprocess
    args = parser.parse_args(argv)
    if args.serve is not None:
        return serve(args.serve, args.records)
    if not 1 <= args.records <= 250:
        parser.error("--records must be 1..250")
    missing = [b for b in ("dnsperf", "dnsmasq") if not shutil.which(b)]
    if missing:
        print(f"dns_qps: not found on PATH: {', '.join(missing)} (apt install dnsperf dnsmasq-base)", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="bgdns-"))
    qfile = root / "queries"
    query_file(qfile, args.records)
    servers = {"banger": free_port(), "dnsmasq": free_port()}
    procs: dict[str, subprocess.Popen[str]] = {}
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in servers}
    try:
        procs["banger"] = start_banger(servers["banger"], args.records)
        procs["dnsmasq"] = start_dnsmasq(servers["dnsmasq"], args.records, root / "dnsmasq.log")
        for name, port in servers.items():
            wait_answering(port, procs[name], name)
            dnsperf(port, qfile, ["-n", "1"])  # warm-up: one pass over the file (caches, page faults)
        for name, port in servers.items():
            results[name]["latency"] = latency_run(port, qfile, args.rate, args.seconds)
        for name, port in servers.items():
            results[name]["saturation"] = saturation_run(port, qfile, args.seconds)
    except KeyboardInterrupt:
        print("dns_qps: interrupted", file=sys.stderr)
        return 130
    finally:
        for proc in procs.values():
            stop(proc)
        served = procs["banger"].stdout.read().strip() if "banger" in procs and procs["banger"].stdout else ""
        shutil.rmtree(root, ignore_errors=True)

    b, d = results["banger"], results["dnsmasq"]
    ratios = {
        "p99": b["latency"]["p99_ms"] / d["latency"]["p99_ms"],
        "saturation": b["saturation"]["qps"] / d["saturation"]["qps"],
    }
    targets = {
        f"banger p99 < {P99_TARGET_MS} ms at {args.rate} qps": b["latency"]["p99_ms"] < P99_TARGET_MS,
        f"banger saturation >= {SATURATION_TARGET}x dnsmasq": ratios["saturation"] >= SATURATION_TARGET,
    }
    meta = {
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "dnsperf": version(["dnsperf", "-h"], r"Version (\S+)"),
        "dnsmasq": version(["dnsmasq", "--version"], r"Dnsmasq version (\S+)"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "records": args.records,
        "seconds": args.seconds,
        "rate": args.rate,
        "banger_server": "banger_dns.server.DnsService, standalone subprocess (no daemon)",
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": results, "ratios": ratios, "targets": targets}, indent=2))
        return 0 if all(targets.values()) else 1

    print(f"python:   {meta['python']}")
    print(f"dnsperf:  {meta['dnsperf']}; dnsmasq: {meta['dnsmasq']}")
    print(f"platform: {meta['platform']}, {meta['cpus']} CPUs")
    print(
        f"zone:     {args.records} names + NXDOMAIN {NX_SHARE:.0%} of queries; {args.seconds:g} s per run; "
        f"banger = {meta['banger_server']}\n"
    )
    header = ["server", "p50 ms", "p99 ms", "max ms", "avg ms", "lost", "saturation qps", "lost", "avg ms"]
    rows = []
    for name in servers:
        lat, sat = results[name]["latency"], results[name]["saturation"]
        rows.append(
            [
                name,
                f"{lat['p50_ms']:.3f}",
                f"{lat['p99_ms']:.3f}",
                f"{lat['max_ms']:.3f}",
                f"{lat['avg_ms']:.3f}",
                f"{lat['lost']:.0f}",
                f"{sat['qps']:.0f}",
                f"{sat['lost']:.0f}",
                f"{sat['avg_ms']:.3f}",
            ]
        )
    rows.append(["banger / dnsmasq", "", f"{ratios['p99']:.2f}x", "", "", "", f"{ratios['saturation']:.2f}x", "", ""])
    print(f"latency at {args.rate} qps (dnsperf -Q {args.rate} -v) | saturation (dnsperf -c 4 -q 100)")
    print_table(header, rows)
    print()
    for what, ok in targets.items():
        print(f"{'PASS' if ok else 'MISS'}  {what}")
    if served:
        print(f"\nbanger's server at exit: {served}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
