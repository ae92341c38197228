#!/usr/bin/env python3
"""How soon a user-mode VM's new listener answers on its forwarded 127.0.0.1 port, and
how soon the forward goes after the listener does; against a host that polls the guest
(`banger vm ports --no-probe` in a loop), in the same rounds.

Everything runs inside a network namespace this benchmark makes (the network safety
rule): the daemon (BANGER_NETNS names it), its user-mode VM (the default image, TCG)
and the forwards on that namespace's loopback; the namespace goes at the end.

Per round, a listener starts in the guest (``vm exec`` of a Python that listens on a
new port, prints ``listening`` and sleeps): from the moment that line reaches the host,
    forward   a connect to 127.0.0.1:PORT succeeds (tried every 5 ms)
    poll      a host poller running `vm ports --no-probe` back to back sees the port
Then the exec is interrupted (the agent kills the listener) and
    removal   127.0.0.1:PORT can be bound again (tried every 5 ms)
Target (issue 15): forward and removal within 3 s. Nothing is asserted.

    .venv/bin/python benchmarks/port_forward.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from report import TEST_CACHE, banger_env, print_table

BANGER = Path(sys.executable).parent / "banger"
VM = "fwdbench"
LISTEN = "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', {port})); s.listen(); print('listening', flush=True); time.sleep(600)"
PROBE = """
import socket, sys, time
port, mode = int(sys.argv[1]), sys.argv[2]
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    s = socket.socket()
    try:
        if mode == "open":
            s.connect(("127.0.0.1", port)); break
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", port)); break
    except OSError:
        time.sleep(0.005)
    finally:
        s.close()
print(time.monotonic())
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    ns = f"bgfwd-{secrets.token_hex(3)}"
    root = Path(tempfile.mkdtemp(prefix="bgpf-", dir="/tmp"))
    env = banger_env(root, cache=TEST_CACHE, netns=ns)
    (root / "cfg").mkdir()
    (root / "cfg" / "config.toml").write_text("[vmm]\naccel = 'tcg'\n")

    def inside(argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def banger(*a: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(inside([str(BANGER), *a]), env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"banger {' '.join(a)} exited {r.returncode}: {r.stderr.strip()[-800:]}")
        return r

    def probe(port: int, mode: str) -> subprocess.Popen[str]:
        # in the namespace, so its clock is this process's (CLOCK_MONOTONIC is system-wide)
        return subprocess.Popen(inside([sys.executable, "-c", PROBE, str(port), mode]), stdout=subprocess.PIPE, text=True)

    def poll_until_seen(port: int, out: dict[str, float]) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = subprocess.run(
                inside([str(BANGER), "vm", "ports", VM, "--json", "--no-probe"]), env=env, capture_output=True, text=True
            )
            if r.returncode == 0 and any(p["port"] == port for p in json.loads(r.stdout)):
                out["seen"] = time.monotonic()
                return

    rows: list[dict[str, float]] = []
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(inside(["ip", "link", "set", "lo", "up"]), check=True)
    try:
        # the default image's build may need the mirror: pulled by a daemon outside the
        # namespace (which changes no network, BANGER_NETNS=none), then the real one starts inside
        outside = {**env, "BANGER_NETNS": "none"}
        for a in (["image", "pull", "debian-bookworm"], ["daemon", "stop"]):
            r = subprocess.run([str(BANGER), *a], env=outside, capture_output=True, text=True, timeout=3600)
            if r.returncode != 0:
                raise RuntimeError(f"banger {' '.join(a)} exited {r.returncode}: {r.stderr.strip()[-800:]}")
        banger("vm", "create", "--name", VM, "--vcpu", "1", "--memory", "1G", "--network", "user")
        for i in range(args.rounds):
            port = 8100 + i
            ex = subprocess.Popen(
                inside([str(BANGER), "vm", "exec", VM, "--", "python3", "-c", LISTEN.format(port=port)]),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # the listener's KeyboardInterrupt at the end of each round
                text=True,
            )
            assert ex.stdout is not None
            opened = probe(port, "open")
            line = ex.stdout.readline()
            t_listen = time.monotonic()
            if line.strip() != "listening":
                raise RuntimeError(f"the guest's listener did not start: {line!r}")
            seen: dict[str, float] = {}
            poller = threading.Thread(target=poll_until_seen, args=(port, seen))
            poller.start()
            t_fwd = float(opened.communicate(timeout=60)[0])
            poller.join()
            ex.send_signal(signal.SIGINT)  # the CLI closes the session: the agent kills the listener
            ex.wait(timeout=60)
            t_close = time.monotonic()
            t_gone = float(probe(port, "free").communicate(timeout=60)[0])
            row = {
                "forward": max(0.0, t_fwd - t_listen),
                "poll": seen.get("seen", float("nan")) - t_listen,
                "removal": max(0.0, t_gone - t_close),
            }
            rows.append(row)
            print(f"round {i + 1}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in row.items()), file=sys.stderr)
    finally:
        subprocess.run(inside([str(BANGER), "vm", "delete", VM, "--force"]), env=env, capture_output=True, timeout=300)
        subprocess.run(inside([str(BANGER), "daemon", "stop"]), env=env, capture_output=True, timeout=120)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(r[k] for r in rows) for k in ("forward", "poll", "removal")}
    table = [
        [k, f"{med[k] * 1000:.0f}", f"{min(r[k] for r in rows) * 1000:.0f}", f"{max(r[k] for r in rows) * 1000:.0f}"]
        for k in ("forward", "poll", "removal")
    ]
    print(f"user-mode port forwards, {args.rounds} rounds (TCG, default image, ms from the guest's change)")
    print_table(["what", "median", "min", "max"], table)
    print(
        f"forward / host polling: {med['forward'] / med['poll']:.2f}x; "
        f"targets: forward <= 3 s: {'met' if med['forward'] <= 3 else 'NOT met'}, "
        f"removal <= 3 s: {'met' if med['removal'] <= 3 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
