#!/usr/bin/env python3
"""banger's smoke suite: end-to-end scenarios against the installed `banger`.

Each scenario gets its own config/state/cache/runtime dirs (the image builds are shared
through one cache) and its own network namespace, which the daemon runs in too; both
are removed afterwards. A preflight runs `banger doctor` and checks that UDP
127.0.0.1:42069 is free.

    scripts/smoke.py --list
    scripts/smoke.py [--scenario NAME ...] [--jobs N] [--quick]

Exit 0 only when every scenario selected passed. Later issues add their scenarios to
SCENARIOS below.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

BANGER = shutil.which("banger") or "banger"
SHARED_CACHE = Path(os.environ.get("BANGER_SMOKE_CACHE", "/var/cache/banger-smoke"))


class Failed(AssertionError):
    pass


def check(cond: object, what: str) -> None:
    if not cond:
        raise Failed(what)


@dataclass
class Env:
    """One scenario's banger: its own dirs, its own network namespace."""

    root: Path
    netns: str

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_")}
        env.update(
            BANGER_CONFIG_DIR=str(self.root / "cfg"),
            BANGER_STATE_DIR=str(self.root / "state"),
            BANGER_CACHE_DIR=str(SHARED_CACHE),
            BANGER_RUNTIME_DIR=str(self.root / "run"),
            NO_COLOR="1",
            BANGER_NETNS=self.netns,  # the bridge, TAPs and rules live in the scenario's namespace, and only there
        )
        return env

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, BANGER, *args]

    def run(self, *args: str, stdin: bytes | None = None, timeout: float = 1800) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(*args), input=stdin, env=self.env(), capture_output=True, timeout=timeout)

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*args), env=self.env(), **kw)  # type: ignore[call-overload]

    def vms(self) -> list[dict]:
        r = self.run("vm", "list", "--json")
        check(r.returncode == 0, f"vm list failed: {r.stderr.decode()}")
        return json.loads(r.stdout)

    def nothing_left(self) -> None:
        check(self.vms() == [], f"VMs left: {self.vms()}")
        vms_dir = self.root / "state" / "vms"
        left = list(vms_dir.iterdir()) if vms_dir.exists() else []
        check(not left, f"VM dirs left: {left}")
        procs = subprocess.run(["pgrep", "-f", f"qemu.*{self.root}"], capture_output=True).stdout
        check(not procs.strip(), f"QEMU processes left: {procs.decode()}")


def out(r: subprocess.CompletedProcess[bytes]) -> str:
    return f"exit {r.returncode}\nstdout: {r.stdout.decode(errors='replace')[-2000:]}\nstderr: {r.stderr.decode(errors='replace')[-2000:]}"


# --- scenarios ------------------------------------------------------------------------


def run_uname(e: Env) -> None:
    r = e.run("vm", "run", "--rm", "--", "uname", "-a")
    check(r.returncode == 0 and r.stdout.startswith(b"Linux "), out(r))
    check(b"spec:" in r.stderr and b"ran in" in r.stderr, "stderr has the spec line and the elapsed time\n" + out(r))
    e.nothing_left()


def run_statuses(e: Env) -> None:
    r = e.run("vm", "run", "--rm", "--", "sh", "-c", "exit 42")
    check(r.returncode == 42, out(r))
    r = e.run("vm", "run", "--rm", "--", "sh", "-c", "kill -TERM $$")
    check(r.returncode == 143, out(r))
    r = e.run("vm", "run", "--rm", "--", "cat", stdin=b"hi\n")
    check(r.returncode == 0 and r.stdout == b"hi\n", out(r))
    e.nothing_left()


def run_refusals(e: Env) -> None:
    for args in (["-d", "--rm"], ["-d", "--", "true"]):
        r = e.run("vm", "run", *args)
        check(r.returncode != 0 and b"-d" in r.stderr, out(r))
    e.nothing_left()


def run_kill9(e: Env) -> None:
    """kill -9 of a `vm run --rm` CLI: the daemon still deletes the VM."""
    p = e.popen(
        "vm", "run", "--rm", "--name", "victim", "--", "sleep", "600", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and not any(v["name"] == "victim" and v["state"] == "running" for v in e.vms()):
        time.sleep(1)
    time.sleep(2)  # the command is running in the guest
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and e.vms():
        time.sleep(1)
    e.nothing_left()


def run_parallel(e: Env) -> None:
    procs = [
        e.popen("vm", "run", "--rm", "--", "echo", f"run{i}", stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)
    ]
    outs = [p.communicate(timeout=1800) for p in procs]
    check(all(p.returncode == 0 for p in procs), f"{[p.returncode for p in procs]} {outs}")
    check(sorted(o[0] for o in outs) == [b"run0\n", b"run1\n"], str(outs))
    e.nothing_left()


def run_warm(e: Env) -> None:
    """The first `vm run` boots and becomes the template; the next restores it: same
    boot id (no boot), its own hostname, nothing left but the template."""
    boot = ["--", "sh", "-c", "cat /proc/sys/kernel/random/boot_id; hostname"]
    first = e.run("vm", "run", "--rm", "--name", "first", *boot)
    check(first.returncode == 0 and b"cold: boots, then becomes the warm-start template" in first.stderr, out(first))
    second = e.run("vm", "run", "--rm", "--name", "second", *boot)
    check(second.returncode == 0 and b"warm: restores template" in second.stderr, out(second))
    check(first.stdout.split()[0] == second.stdout.split()[0], "the warm run has the template's boot id\n" + out(second))
    check(second.stdout.split()[1] == b"second", "the warm run has its own hostname\n" + out(second))
    e.nothing_left()
    r = e.run("image", "warm", "--rm")
    check(r.returncode == 0 and b"template-" in r.stdout, out(r))


def run_snapshot(e: Env) -> None:
    """Snapshot a VM with a file written, restore it twice, delete everything."""
    r = e.run("vm", "run", "-d", "--cold", "--name", "src")
    check(r.returncode == 0, out(r))
    r = e.run("vm", "exec", "src", "--", "sh", "-c", "echo kept > /root/f")
    check(r.returncode == 0, out(r))
    r = e.run("vm", "snapshot", "src", "--name", "s1")
    check(r.returncode == 0, out(r))
    for name in ("c1", "c2"):
        r = e.run("vm", "restore", "s1", "--name", name)
        check(r.returncode == 0, out(r))
        r = e.run("vm", "exec", name, "--", "sh", "-c", "cat /root/f; hostname")
        check(r.returncode == 0 and r.stdout == f"kept\n{name}\n".encode(), out(r))
    r = e.run("snapshot", "delete", "s1")
    check(r.returncode != 0 and b"stand on it" in r.stderr, out(r))
    r = e.run("vm", "delete", "--force", "src", "c1", "c2")
    check(r.returncode == 0, out(r))
    r = e.run("snapshot", "delete", "s1")
    check(r.returncode == 0, out(r))
    e.nothing_left()
    left = list((e.root / "state" / "snapshots").iterdir())
    check(not left, f"snapshot dirs left: {left}")


INTERNET = "10.99.0.2"
UPLINK = "10.99.0.1"
# bash's /dev/tcp: the default image has neither curl nor wget
GET = f"exec 3<>/dev/tcp/{INTERNET}/8080 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 10 cat <&3"


def _ns(netns: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, timeout=60)


def _dns(e: Env, name: str) -> tuple[str, list[str]]:
    code = (
        "import dnslib, json; q = dnslib.DNSRecord.question(%r); "
        "r = dnslib.DNSRecord.parse(q.send('127.0.0.1', 42069, timeout=5)); "
        "print(json.dumps([dnslib.RCODE[r.header.rcode], [str(a.rdata) for a in r.rr]]))" % name
    )
    r = _ns(e.netns, sys.executable, "-c", code)
    check(r.returncode == 0, out(r))
    rcode, answers = json.loads(r.stdout)
    return rcode, answers


@contextlib.contextmanager
def _internet(e: Env) -> Iterator[None]:
    """An 'internet' namespace behind the scenario's (a veth, a default route), where
    tests/peer_http.py answers GETs on INTERNET:8080 with the client's address."""
    inet = f"{e.netns}-inet"
    subprocess.run(["ip", "netns", "add", inet], check=True)
    server = None
    try:
        subprocess.run(
            ["ip", "link", "add", "up0", "netns", e.netns, "type", "veth", "peer", "name", "wan0", "netns", inet], check=True
        )
        for ns, dev, addr in ((e.netns, "up0", UPLINK), (inet, "wan0", INTERNET)):
            check(_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", dev).returncode == 0, "veth address")
            check(_ns(ns, "ip", "link", "set", dev, "up").returncode == 0, "veth up")
        check(_ns(e.netns, "ip", "route", "add", "default", "via", INTERNET).returncode == 0, "default route")
        peer = Path(__file__).resolve().parent.parent / "tests" / "peer_http.py"  # answers with the client's address
        server = subprocess.Popen(["ip", "netns", "exec", inet, sys.executable, str(peer), INTERNET])
        yield
    finally:
        if server is not None:
            server.kill()
        subprocess.run(["ip", "netns", "delete", inet], capture_output=True)


def run_network(e: Env) -> None:
    """Bridge, NAT and DNS on the default image: two VMs (one with --nat) reach each
    other, resolve as NAME.vm, only the NAT one reaches an 'internet' namespace (as the
    uplink's address); after stop/start one rule set; after delete only pool TAPs."""
    with _internet(e):
        for args in (["--name", "a", "--nat"], ["--name", "b"]):
            r = e.run("vm", "run", "-d", "--cold", *args)
            check(r.returncode == 0, out(r))
        shown = {n: json.loads(e.run("vm", "show", n, "--json").stdout)["fields"]["network"] for n in ("a", "b")}
        check(shown["a"]["mode"] == "bridge" and shown["a"]["address"] != shown["b"]["address"], str(shown))
        # the default image has no ping: a's TCP connection to b's sshd, its banner back
        r = e.run(
            "vm", "exec", "a", "--", "bash", "-c", f"exec 3<>/dev/tcp/{shown['b']['address']}/22 && timeout 10 head -c 7 <&3"
        )
        check(r.returncode == 0 and r.stdout == b"SSH-2.0", "a reaches b's sshd\n" + out(r))
        # vm ssh to a bridge VM goes straight to its address: sshd sees the bridge's
        r = e.run("vm", "ssh", "b", "--", "sh", "-c", "echo $SSH_CLIENT")
        check(r.returncode == 0 and r.stdout.split()[:1] == [b"172.30.0.1"], "vm ssh b: direct, from the bridge\n" + out(r))
        check(_dns(e, "a.vm") == ("NOERROR", [shown["a"]["address"]]), "a.vm resolves")
        r = e.run("vm", "ports", "a", "--json")
        check(r.returncode == 0 and any(p["endpoint"] == "a.vm:22" for p in json.loads(r.stdout)), "sshd as a.vm:22\n" + out(r))
        check(_dns(e, "nosuch.vm")[0] == "NXDOMAIN" and _dns(e, "example.com")[0] == "REFUSED", "NXDOMAIN / REFUSED")
        r = e.run("vm", "exec", "a", "--", "bash", "-c", GET)
        check(r.returncode == 0 and r.stdout.strip().endswith(UPLINK.encode()), "a reaches the internet masqueraded\n" + out(r))
        r = e.run("vm", "exec", "b", "--", "bash", "-c", GET)
        check(not r.stdout.strip().endswith(UPLINK.encode()), "b has no way out\n" + out(r))
        for _ in range(2):
            check(e.run("vm", "stop", "a").returncode == 0, "stop a")
            check(e.run("vm", "start", "a").returncode == 0, "start a")
        rules = _ns(e.netns, "iptables-save").stdout.decode()
        mine = [ln for ln in rules.splitlines() if f"{shown['a']['address']}/32" in ln]
        check(len(mine) == 3, "one MASQUERADE and two FORWARD rules for a:\n" + "\n".join(mine))
        check(e.run("vm", "delete", "--force", "a", "b").returncode == 0, "delete")
        links = _ns(e.netns, "ip", "-o", "link", "show").stdout.decode()
        check("bt-" not in links, "no VM TAP left:\n" + links)
        rules = _ns(e.netns, "iptables-save").stdout.decode()
        check("banger:nat:" not in rules, "no NAT rule left:\n" + rules)
        e.nothing_left()


def _host_state(e: Env) -> tuple[str, ...]:
    """The scenario namespace's links, addresses and firewall rules."""
    out = [_ns(e.netns, *argv).stdout.decode() for argv in (["ip", "-o", "link"], ["ip", "-o", "addr"], ["iptables-save"])]
    out[1] = out[1].replace(" tentative", "")  # an IPv6 link-local address still in duplicate detection
    out[2] = "\n".join(ln for ln in out[2].splitlines() if not ln.startswith("#"))  # its timestamps
    return tuple(out)


def _forward(e: Env, vm: str, port: int, wait: float = 30) -> str:
    """The host endpoint ``vm ports`` shows for the guest's ``port`` once it is a
    127.0.0.1 forward (or what it showed last, after ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    endpoint = ""
    while time.monotonic() < deadline and not endpoint.startswith("127.0.0.1:"):
        ports = json.loads(e.run("vm", "ports", vm, "--json", "--no-probe").stdout or "[]")
        endpoint = next((p["endpoint"] for p in ports if p["port"] == port), "")
        time.sleep(0.3)
    return endpoint


def run_network_user(e: Env) -> None:
    """User mode on the default image: egress with nothing made on the host, a server
    in the guest answers on 127.0.0.1 of the daemon's namespace, and goes with the VM."""
    with _internet(e):
        before = _host_state(e)
        r = e.run("vm", "run", "-d", "--cold", "--name", "u", "--network", "user")
        check(r.returncode == 0, out(r))
        r = e.run("vm", "exec", "u", "--", "bash", "-c", GET)
        check(r.returncode == 0 and r.stdout.strip().endswith(UPLINK.encode()), "u reaches the internet\n" + out(r))
        r = e.run(
            "vm",
            "exec",
            "u",
            "--",
            "bash",
            "-c",
            "cd /tmp && echo hi > hi.txt && setsid -f python3 -m http.server 8000 >/dev/null 2>&1",
        )
        check(r.returncode == 0, out(r))
        endpoint = _forward(e, "u", 8000)
        check(endpoint.startswith("127.0.0.1:"), f"port 8000 forwarded: {endpoint!r}")
        # vm ssh to a user-mode VM goes through the agent: sshd sees its own loopback
        r = e.run("vm", "ssh", "u", "--", "sh", "-c", "echo $SSH_CLIENT")
        check(r.returncode == 0 and r.stdout.split()[:1] == [b"127.0.0.1"], "vm ssh u: through the agent\n" + out(r))
        url = f"http://{endpoint}/hi.txt"
        got = _ns(e.netns, sys.executable, "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())")
        check(got.stdout.strip() == b"hi", "the guest's server answers on its forward\n" + out(got))
        after = _host_state(e)
        diff = [
            ln
            for a, b in zip(before, after, strict=True)
            for ln in difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="")
        ]
        check(after == before, "user mode made nothing on the host:\n" + "\n".join(diff))
        check(e.run("vm", "delete", "--force", "u").returncode == 0, "delete")
        e.nothing_left()


def run_fork(e: Env) -> None:
    """vm fork of a user-mode VM running a web server: each fork answers on its own
    127.0.0.1 forward as itself, reaches the internet, outlives the source; nothing is
    left once all are deleted (no snapshot, no RAM file)."""
    with _internet(e):
        r = e.run("vm", "run", "-d", "--cold", "--name", "u", "--network", "user")
        check(r.returncode == 0, out(r))
        serve = (
            "mkdir -p /tmp/www && hostname > /tmp/www/who && cd /tmp/www && setsid -f python3 -m http.server 8000 >/dev/null 2>&1"
        )
        check(e.run("vm", "exec", "u", "--", "bash", "-c", serve).returncode == 0, "the server starts")
        r = e.run("vm", "fork", "u", "--count", "2", "--name", "uf", "--json")
        check(r.returncode == 0, out(r))
        made = json.loads(r.stdout)["vms"]
        ids = [v["id"] for v in made] + [v["id"] for v in e.vms() if v["name"] == "u"]
        check(e.run("vm", "delete", "--force", "u").returncode == 0, "delete the source")
        for v in made:
            name = v["name"]
            r = e.run("vm", "exec", name, "--", "bash", "-c", f"hostname > /tmp/www/who && {GET}")
            check(r.returncode == 0 and r.stdout.strip().endswith(UPLINK.encode()), f"{name} reaches the internet\n" + out(r))
            endpoint = _forward(e, name, 8000)
            url = f"http://{endpoint}/who"
            code = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
            got = _ns(e.netns, sys.executable, "-c", code)
            check(got.stdout.strip() == name.encode(), f"{name}'s server answers as {name} on its own forward\n" + out(got))
        check(e.run("vm", "delete", "--force", *(v["name"] for v in made)).returncode == 0, "delete the forks")
        e.nothing_left()
        left = list((e.root / "state" / "snapshots").iterdir())
        check(not left, f"snapshot dirs left: {left}")
        ram = [p for p in Path(f"/dev/shm/banger-{os.getuid()}").glob("*.ram") if p.stem in ids]
        check(not ram, f"RAM files left: {ram}")


# --- the workspace plugin ---------------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "smoke",
    "GIT_AUTHOR_EMAIL": "smoke@example.invalid",
    "GIT_COMMITTER_NAME": "smoke",
    "GIT_COMMITTER_EMAIL": "smoke@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}
GUEST_COMMIT = "git -c user.email=a@b -c user.name=n commit -qam x"
# every file but .git's, with its digest, in C order: a tree's content to compare
DIGESTS = "find . -type f ! -path './.git/*' -exec sha256sum {} + | LC_ALL=C sort"


def _git(cwd: Path, *args: str) -> bytes:
    r = subprocess.run(["git", "-C", str(cwd), *args], env={**os.environ, **GIT_ENV}, capture_output=True, timeout=120)
    check(r.returncode == 0, f"git {' '.join(args)} in {cwd}:\n{out(r)}")
    return r.stdout


def _repo(where: Path, files: dict[str, str]) -> Path:
    """A git repository at ``where`` holding ``files`` (path: text), committed."""
    for path, text in files.items():
        (where / path).parent.mkdir(parents=True, exist_ok=True)
        (where / path).write_text(text)
    _git(where, "init", "-q", "-b", "main")
    _git(where, "add", "-A")
    _git(where, "commit", "-q", "-m", "first")
    return where


def run_workspace_roundtrip(e: Env) -> None:
    """prepare copies a repository into a VM (host edits as uncommitted edits); the guest
    commits, edits, adds text and binary files, under a full 1 MiB /tmp; export against
    the host's HEAD applies to a fresh clone and gives the guest's files exactly; a plain
    export leaves the guest's commit out; the guest's staged set is untouched."""
    repo = _repo(
        e.root / "repo",
        {
            "tracked.txt": "tracked\n",
            "committed.txt": "committed\n",
            "gone.txt": "deleted in the guest\n",
            "dir/a.txt": "a\n",
            "dir/sub/b.txt": "b\n",
        },
    )
    head = _git(repo, "rev-parse", "HEAD").decode().strip()
    (repo / "committed.txt").write_text("committed\nan uncommitted host edit\n")
    r = e.run("vm", "create", "--name", "wsr")
    check(r.returncode == 0, out(r))
    r = e.run("vm", "workspace", "prepare", "wsr", str(repo))
    check(r.returncode == 0 and b"/root/repo" in r.stdout, out(r))
    r = e.run("vm", "exec", "wsr", "--", "sh", "-c", "pwd; cat tracked.txt committed.txt; git status --porcelain")
    check(
        r.returncode == 0 and r.stdout == b"/root/repo\ntracked\ncommitted\nan uncommitted host edit\n M committed.txt\n",
        "vm exec runs in /root/repo, the host's edit is an uncommitted edit there\n" + out(r),
    )
    script = (
        f"set -e; echo guest-commit >> dir/a.txt; {GUEST_COMMIT}; "
        "echo staged >> dir/sub/b.txt; git add dir/sub/b.txt; "
        "echo uncommitted >> tracked.txt; rm gone.txt; echo untracked > new.txt; "
        "mkdir -p newdir; head -c 4096 /dev/urandom > newdir/blob.bin; "
        "mount -t tmpfs -o size=1m tmpfs /tmp; head -c 2097152 /dev/zero > /tmp/fill 2>/dev/null || true; "
        "git diff --cached --name-only"
    )
    r = e.run("vm", "exec", "wsr", "--", "sh", "-c", script)
    check(r.returncode == 0 and r.stdout == b"dir/sub/b.txt\n", "the guest's changes, one staged\n" + out(r))
    staged = r.stdout
    patch = e.root / "full.patch"
    r = e.run("vm", "workspace", "export", "wsr", "--base-commit", head, "-o", str(patch))
    check(r.returncode == 0 and patch.exists(), "export --base-commit under a full /tmp\n" + out(r))
    for name in ("dir/a.txt", "dir/sub/b.txt", "tracked.txt", "committed.txt", "gone.txt", "new.txt", "newdir/blob.bin"):
        check(name.encode() in r.stderr, f"the export lists {name}\n" + out(r))
    r = e.run("vm", "exec", "wsr", "--", "git", "diff", "--cached", "--name-only")
    check(r.returncode == 0 and r.stdout == staged, f"the staged set is as it was ({staged!r})\n" + out(r))
    r = e.run("vm", "workspace", "export", "wsr")
    check(r.returncode == 0 and b"diff --git a/tracked.txt b/tracked.txt" in r.stdout, "a plain export\n" + out(r))
    check(b"diff --git a/dir/a.txt" not in r.stdout, "a plain export leaves the guest's commit out\n" + out(r))
    clone = e.root / "clone"
    r = subprocess.run(["git", "clone", "-q", str(repo), str(clone)], env={**os.environ, **GIT_ENV}, capture_output=True)
    check(r.returncode == 0, out(r))
    _git(clone, "apply", "--binary", str(patch))
    host = subprocess.run(["sh", "-c", DIGESTS], cwd=clone, capture_output=True, timeout=60)
    check(host.returncode == 0, out(host))
    guest = e.run("vm", "exec", "wsr", "--", "sh", "-c", DIGESTS)
    check(guest.returncode == 0, out(guest))
    diff = "\n".join(difflib.unified_diff(guest.stdout.decode().splitlines(), host.stdout.decode().splitlines(), lineterm=""))
    check(host.stdout == guest.stdout and b"./newdir/blob.bin" in host.stdout, "the patched clone is the guest's copy:\n" + diff)
    r = e.run("vm", "delete", "--force", "wsr")
    check(r.returncode == 0, out(r))
    e.nothing_left()


def run_workspace_run(e: Env) -> None:
    """vm run PATH: the repository at /root/repo; an untracked .env only with
    --include-untracked; --dry-run makes nothing; an unknown flag and a missing -- are
    refused."""
    repo = _repo(e.root / "repo", {"tracked.txt": "tracked\n"})
    (repo / ".env").write_text("SECRET=1\n")
    r = e.run("vm", "run", "--rm", str(repo), "--", "cat", "/root/repo/tracked.txt")
    check(r.returncode == 0 and r.stdout == b"tracked\n", out(r))
    r = e.run("vm", "run", "--rm", str(repo), "--", "cat", "/root/repo/.env")
    check(r.returncode != 0 and r.stdout == b"", "untracked .env left out by default\n" + out(r))
    r = e.run("vm", "run", "--rm", "--include-untracked", str(repo), "--", "cat", "/root/repo/.env")
    check(r.returncode == 0 and r.stdout == b"SECRET=1\n", "--include-untracked sends .env\n" + out(r))
    r = e.run("vm", "run", "--dry-run", str(repo), "--", "true")
    check(r.returncode == 0 and b"dry run" in r.stderr, out(r))
    check(e.vms() == [], f"--dry-run made a VM: {e.vms()}")
    r = e.run("vm", "run", "--readonly", str(repo), "--", "true")
    check(r.returncode == 2 and b"--readonly" in r.stderr, "an unknown option: a usage error\n" + out(r))
    r = e.run("vm", "run", "echo", "hi")
    check(r.returncode != 0 and b"did you mean" in r.stderr, "vm run echo hi (no --)\n" + out(r))
    e.nothing_left()


def run_workspace_restart(e: Env) -> None:
    """A workspace survives stop/start, and comes with a snapshot to a restored VM
    (where vm exec runs in it and export sees the file)."""
    repo = _repo(e.root / "repo", {"tracked.txt": "tracked\n"})
    r = e.run("vm", "create", "--name", "wss")
    check(r.returncode == 0, out(r))
    r = e.run("vm", "workspace", "prepare", "wss", str(repo))
    check(r.returncode == 0, out(r))
    r = e.run("vm", "exec", "wss", "--", "sh", "-c", "echo kept > /root/repo/marker.txt")
    check(r.returncode == 0, out(r))
    check(e.run("vm", "stop", "wss").returncode == 0, "stop wss")
    check(e.run("vm", "start", "wss").returncode == 0, "start wss")
    here = ["--", "sh", "-c", "pwd; cat marker.txt tracked.txt"]
    r = e.run("vm", "exec", "wss", *here)
    check(r.returncode == 0 and r.stdout == b"/root/repo\nkept\ntracked\n", "after stop/start\n" + out(r))
    r = e.run("vm", "snapshot", "wss", "--name", "ws1")
    check(r.returncode == 0, out(r))
    r = e.run("vm", "restore", "ws1", "--name", "wsc")
    check(r.returncode == 0, out(r))
    r = e.run("vm", "exec", "wsc", *here)
    check(r.returncode == 0 and r.stdout == b"/root/repo\nkept\ntracked\n", "in the restored VM\n" + out(r))
    r = e.run("vm", "workspace", "export", "wsc")
    check(r.returncode == 0 and b"b/marker.txt" in r.stdout, "the restored VM's export has the marker\n" + out(r))
    r = e.run("vm", "delete", "--force", "wss", "wsc")
    check(r.returncode == 0, out(r))
    r = e.run("snapshot", "delete", "ws1")
    check(r.returncode == 0, out(r))
    e.nothing_left()
    left = list((e.root / "state" / "snapshots").iterdir())
    check(not left, f"snapshot dirs left: {left}")


def run_bootstrap_precondition(e: Env) -> None:
    """A repository declaring a toolchain (.mise.toml) in a VM with no egress is refused
    before any VM exists, saying how (--nat); --no-bootstrap runs it."""
    repo = _repo(e.root / "repo", {".mise.toml": "[tools]\n", "tracked.txt": "tracked\n"})
    for net in ([], ["--network", "none"]):  # the default here (a bridge, no NAT), and none
        r = e.run("vm", "run", "--rm", *net, str(repo), "--", "true")
        check(r.returncode != 0 and b"egress" in r.stderr and b"--nat" in r.stderr, f"refused {net}\n" + out(r))
        check(e.vms() == [], f"a refused run made a VM: {e.vms()}")
    r = e.run("vm", "run", "--rm", "--network", "none", "--no-bootstrap", str(repo), "--", "cat", "tracked.txt")
    check(r.returncode == 0 and r.stdout == b"tracked\n", "--no-bootstrap\n" + out(r))
    e.nothing_left()


SCENARIOS: dict[str, tuple[Callable[[Env], None], bool, str]] = {
    # name: (function, quick (run in CI), what it shows)
    "run-uname": (run_uname, True, "vm run --rm -- uname -a prints the guest's kernel and leaves nothing"),
    "run-statuses": (run_statuses, False, "exit 42, 143 for TERM, stdin through cat"),
    "run-refusals": (run_refusals, True, "-d --rm and -d -- CMD are refused with no VM made"),
    "run-kill9": (run_kill9, False, "kill -9 of a vm run --rm CLI still deletes the VM"),
    "run-parallel": (run_parallel, False, "two vm run --rm at once both succeed"),
    "run-warm": (run_warm, True, "the second vm run restores the first's template: its boot id, its own hostname"),
    "snapshot": (run_snapshot, False, "snapshot, two restores with the file and their own names, delete refused then done"),
    "network": (
        run_network,
        False,
        "bridge + NAT + DNS: two VMs, NAME.vm, egress only with --nat, vm ssh direct, one rule set, nothing left",
    ),
    "network-user": (
        run_network_user,
        False,
        "user mode: egress, nothing on the host, a guest server on its 127.0.0.1 forward, vm ssh",
    ),
    "fork": (
        run_fork,
        False,
        "vm fork of a user-mode VM: each fork answers on its own forward as itself, reaches out, outlives the source",
    ),
    "workspace-roundtrip": (
        run_workspace_roundtrip,
        False,
        "workspace prepare, guest commit + edits + binary under a full /tmp, export applies to a clone exactly",
    ),
    "workspace-run": (
        run_workspace_run,
        False,
        "vm run PATH: /root/repo, .env only with --include-untracked, --dry-run makes nothing, refusals",
    ),
    "workspace-restart": (
        run_workspace_restart,
        False,
        "a workspace survives stop/start and a snapshot's restore (exec in it, export sees it)",
    ),
    "bootstrap-precondition": (
        run_bootstrap_precondition,
        False,
        ".mise.toml without egress refused before a VM exists (says --nat); --no-bootstrap runs",
    ),
}


# --- the runner -----------------------------------------------------------------------


def preflight() -> list[str]:
    problems = []
    if shutil.which("banger") is None:
        problems.append("banger is not on PATH (scripts/install.sh links it)")
    else:
        r = subprocess.run([BANGER, "doctor"], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append("banger doctor failed:\n" + r.stdout + r.stderr)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", 42069))
    except OSError as exc:
        problems.append(f"UDP 127.0.0.1:42069 is not free: {exc}")
    finally:
        s.close()
    if os.geteuid() != 0:
        problems.append("the smoke suite makes network namespaces: run it as root")
    return problems


def prime_cache() -> str | None:
    """Make sure the shared cache holds the default image's build as a plain `banger`
    makes it, by pulling it once outside any namespace (with the host's network): the
    scenarios run where no mirror is reachable, and a cache last written by a build
    with other guest payload (a test run with the example plugin) would make each of
    them rebuild. None, or why it failed."""
    root = Path(tempfile.mkdtemp(prefix="smk-prime-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_")}
    env.update(
        BANGER_CONFIG_DIR=str(root / "cfg"),
        BANGER_STATE_DIR=str(root / "state"),
        BANGER_CACHE_DIR=str(SHARED_CACHE),
        BANGER_RUNTIME_DIR=str(root / "run"),
        NO_COLOR="1",
    )
    try:
        r = subprocess.run([BANGER, "image", "pull", "debian-bookworm"], env=env, capture_output=True, text=True, timeout=3600)
        return None if r.returncode == 0 else f"image pull debian-bookworm: {r.stderr.strip()[-800:]}"
    finally:
        subprocess.run([BANGER, "daemon", "stop"], env=env, capture_output=True)
        subprocess.run(["pkill", "-9", "-f", str(root)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def run_one(name: str) -> tuple[str, bool, float, str]:
    fn = SCENARIOS[name][0]
    root = Path(tempfile.mkdtemp(prefix="smk-", dir="/tmp"))
    netns = f"smoke-{secrets.token_hex(4)}"
    t = time.monotonic()
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        e = Env(root, netns)
        (root / "cfg").mkdir(parents=True)
        fn(e)
        return name, True, time.monotonic() - t, ""
    except Exception as exc:  # a scenario's failure is reported, the others go on
        return name, False, time.monotonic() - t, f"{type(exc).__name__}: {exc}"
    finally:
        env = Env(root, netns)
        subprocess.run(env.argv("daemon", "stop"), env=env.env(), capture_output=True)
        subprocess.run(["pkill", "-9", "-f", str(root)], capture_output=True)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the scenarios")
    ap.add_argument("--scenario", action="append", default=[], help="run this one (repeatable)")
    ap.add_argument("--quick", action="store_true", help="only the quick subset (what CI runs)")
    ap.add_argument("--jobs", type=int, default=1, help="scenarios at once")
    args = ap.parse_args(argv)
    if args.list:
        for name, (_fn, quick, what) in SCENARIOS.items():
            print(f"{name:22} {'quick' if quick else '     '}  {what}")
        return 0
    unknown = [s for s in args.scenario if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    names = args.scenario or [n for n, (_f, quick, _w) in SCENARIOS.items() if quick or not args.quick]
    problems = preflight()
    if problems:
        print("preflight failed:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    SHARED_CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    why = prime_cache()
    if why:
        print(f"priming the image cache failed:\n{why}", file=sys.stderr)
        return 1
    print(f"image cache primed in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run_one, names))
    for name, ok, secs, why in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name:22} {secs:7.1f}s  {why.splitlines()[0] if why else ''}")
        if why and len(why.splitlines()) > 1:
            print("      " + "\n      ".join(why.splitlines()[1:]))
    failed = [r for r in results if not r[1]]
    print(f"{len(results)} scenario(s), {len(failed)} failed, {time.monotonic() - t0:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
