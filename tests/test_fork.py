"""`vm fork`: one running bridge VM with NAT and a prepared workspace, forked two ways,
as a new user would, inside network namespaces this module makes (the network safety
rule): the daemon runs in ``host``, whose uplink leads to ``internet``, where
tests/peer_http.py answers with the address it saw.

Boots: the source (the default image: sshd and git are the point) and one cold
`vm run` in bridge mode that makes the warm-start template the next run restores.
The forks are restores, not boots.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

import guest_assets as ga
from conftest import isolated_env
from netns import delete_vms_and_stop, uplinked
from test_network import NetEnv, free_port
from test_workspace import git

LONG = 1800
SPEC = ["--vcpu", "1", "--memory", "1G"]
INTERNET = "10.97.0.2"
UPLINK = "10.97.0.1"
GET = f"""python3 -c 'import urllib.request as u; print(u.urlopen("http://{INTERNET}:8080/", timeout=10).read().decode())'"""
FORKS = ("f-1", "f-2")
# a counter the forks inherit: a process that was running in the source goes on in each
COUNTER = 'nohup sh -c "while true; do i=\\$((i+1)); echo \\$i > /root/count; sleep 0.1; done" >/dev/null 2>&1 & echo $!'

pytestmark = [pytest.mark.slow]


def make_repo(where: Path) -> Path:
    r = where / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "a.txt").write_text("a\n")
    git(r, "add", ".")
    git(r, "commit", "-qm", "init")
    return r


@pytest.fixture(scope="module")
def fnet(tmp_path_factory):
    with uplinked("bgt-fhost", "bgt-finet", UPLINK, INTERNET) as (host, inet):
        with isolated_env() as env:
            env.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
            (env.root / "home" / ".ssh").mkdir(parents=True, mode=0o700)
            env.extra_env["HOME"] = str(env.root / "home")  # ssh-config --install writes $HOME/.ssh/config
            dns_port = free_port()
            env.write_config(f"[vmm]\naccel = 'tcg'\nstop_timeout_s = 30\n[dns]\nport = {dns_port}\n[network]\ntap_pool = 1\n")
            env.run("image", "pull", "debian-bookworm", check=True, timeout=LONG)  # outside: the cache, a local build
            env.stop_daemon()
            env.extra_env["BANGER_NETNS"] = host.name
            n = NetEnv(env, host, inet, dns_port)
            n.run("daemon", "start", check=True)
            n.repo = make_repo(tmp_path_factory.mktemp("fork"))
            yield n
            delete_vms_and_stop(n.run)


@pytest.fixture(scope="module")
def forked(fnet):
    n = fnet
    n.run("vm", "run", "-d", "--name", "src", "--nat", *SPEC, str(n.repo), check=True, timeout=LONG)
    n.counter = n.ex("src", COUNTER).stdout.strip()
    n.ex("src", "echo src-only > /root/before-fork")
    t0 = time.monotonic()
    out = json.loads(n.run("vm", "fork", "src", "--count", "2", "--name", "f", "--json", check=True, timeout=600).stdout)
    n.fork_s = time.monotonic() - t0
    assert [v["name"] for v in out["vms"]] == list(FORKS)
    return n


def sh(n: NetEnv, vm: str, cmd: str) -> str:
    r = n.ex(vm, cmd)
    assert r.returncode == 0, f"{vm}: {cmd}: {r.stdout} {r.stderr}"
    return r.stdout.strip()


def test_bad_forks_are_refused_and_leave_nothing(fnet):
    n = fnet
    cases = [
        (["vm", "fork", "nosuch"], "no VM"),
        (["vm", "fork", "nosuch", "--count", "0"], "--count"),
        (["vm", "fork", "nosuch", "--count", "65"], "--count"),
        (["vm", "fork", "nosuch", "--name", "Bad_Name"], "invalid fork prefix name"),
        (["vm", "fork", "nosuch", "--name", "x" * 62, "--count", "2"], "invalid fork name"),
    ]
    for argv, said in cases:
        r = n.run(*argv)
        assert r.returncode != 0 and said in r.stderr, (argv, r.stderr)
    assert json.loads(n.run("vm", "list", "--json", check=True).stdout) == []
    assert json.loads(n.run("snapshot", "list", "--json", check=True).stdout) == []


def test_forks_go_on_from_the_source_each_a_vm_of_its_own(forked):
    n = forked
    print(f"vm fork --count 2 took {n.fork_s:.2f}s (reported only)")
    src = n.net("src")
    nets = {f: n.net(f) for f in FORKS}
    assert len({src["address"], *(d["address"] for d in nets.values())}) == 3
    assert len({src["mac"], *(d["mac"] for d in nets.values())}) == 3
    for f, d in nets.items():
        # what the source had: its processes and files (the counter counts on in each)
        assert sh(n, f, f"kill -0 {n.counter} && echo alive") == "alive"
        first = int(sh(n, f, "cat /root/count"))
        time.sleep(1)
        assert int(sh(n, f, "cat /root/count")) > first
        assert sh(n, f, "cat /root/before-fork") == "src-only"
        # its own identity
        assert sh(n, f, "hostname") == f
        assert f"inet {d['address']}/24" in sh(n, f, "ip -4 addr show eth0")
        assert n.dns(f"{f}.vm") == ("NOERROR", [d["address"]])
        # NAT: its own rules, masqueraded to the uplink's address
        assert sh(n, f, GET).endswith(UPLINK)
        assert [r for r in n.rules() if f"{d['address']}/32" in r and "MASQUERADE" in r]
        # ssh NAME.vm: straight to the fork's address, sshd sees the bridge's
        r = n.run("vm", "ssh", f, "--", "sh", "-c", "echo $SSH_CLIENT; hostname", timeout=120)
        assert r.returncode == 0 and r.stdout.split()[0] == "172.30.0.1" and r.stdout.split()[-1] == f, r.stdout + r.stderr
    # plain `ssh NAME.vm` (ssh-config's Include; -F: ssh reads the passwd home): each
    # fork's own host key was pinned under its name, so no warning
    n.run("ssh-config", "--install", check=True)
    ssh = ["ssh", "-F", str(n.env.root / "home" / ".ssh" / "config"), "-o", "BatchMode=yes"]
    for f in FORKS:
        r = subprocess.run(
            n.host.argv([*ssh, f"{f}.vm", "hostname"]), env=n.env.env(), capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0 and r.stdout.strip() == f and r.stderr == "", r.stdout + r.stderr
    ids = {v: sh(n, v, "cat /etc/machine-id") for v in ("src", *FORKS)}
    keys = {v: sh(n, v, "cat /etc/ssh/ssh_host_ed25519_key.pub") for v in ("src", *FORKS)}
    rand = {v: sh(n, v, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'") for v in FORKS}
    assert len(set(ids.values())) == 3 and len(set(keys.values())) == 3 and len(set(rand.values())) == 2
    assert n.show("src")["state"] == "running"  # the source ran on
    # names taken: refused, and no snapshot or VM is left of the attempt
    r = n.run("vm", "fork", "src", "--count", "2", "--name", "f", timeout=600)
    assert r.returncode != 0 and "f-1, f-2 already exist" in r.stderr, r.stderr
    kinds = [s["kind"] for s in json.loads(n.run("snapshot", "list", "--json", check=True).stdout)]
    assert sorted(kinds) == ["fork", "template"], kinds  # the template: src's first `vm run` made it
    assert sorted(v["name"] for v in json.loads(n.run("vm", "list", "--json", check=True).stdout)) == ["f-1", "f-2", "src"]


def test_forks_share_the_memory_they_were_forked_with(forked):
    """Each fork's QEMU maps the fork snapshot's memory file privately: the pages the
    guest only reads are one copy in the host's page cache, mapped by both."""
    n = forked
    snaps = json.loads(n.run("snapshot", "list", "--json", check=True).stdout)
    (snap,) = [s for s in snaps if s["kind"] == "fork"]
    memory = Path(snap["dir"]) / "memory"
    assert memory.stat().st_size == 1 << 30 and memory.stat().st_blocks * 512 < 1 << 30  # sparse: the data only
    for f in FORKS:
        pid = n.show(f)["pid"]
        assert str(memory) in Path(f"/proc/{pid}/maps").read_text()
        rollup = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        shared_kib = int(rollup["Shared_Clean"].split()[0]) + int(rollup["Shared_Dirty"].split()[0])
        assert shared_kib > 32 * 1024, rollup  # the guest's kernel, page cache, processes
    # the source's RAM is a file of its own on the tmpfs (the next fork copies it)
    assert (n.env.memory_dir / f"{n.show('src')['id']}.ram").exists()


def test_each_fork_exports_only_its_own_workspace_changes(forked):
    n = forked
    head = git(n.repo, "rev-parse", "HEAD").strip()
    for f in FORKS:
        sh(n, f, f"cd /root/repo && echo {f} > {f}.txt && echo {f} >> a.txt")
    for f in FORKS:
        patch = n.run("vm", "workspace", "export", f, "--base-commit", head, check=True, timeout=300).stdout
        other = next(o for o in FORKS if o != f)
        assert f"+++ b/{f}.txt" in patch and f"+{f}" in patch, patch
        assert other not in patch, patch
    assert n.run("vm", "workspace", "export", "src", check=True, timeout=300).stdout.strip() == ""


def test_a_fork_of_a_fork_copies_its_memory_once_and_its_forks_share_it(forked):
    """f-1's RAM is a private mapping (it was restored): its snapshot's stream carries
    the RAM, split on its way to disk into a memory file its forks map."""
    n = forked
    sh(n, "f-1", "echo from-f-1 > /root/mark")
    out = json.loads(n.run("vm", "fork", "f-1", "--count", "2", "--name", "g", "--json", check=True, timeout=600).stdout)
    forks = [v["name"] for v in out["vms"]]
    snap = next(s for s in json.loads(n.run("snapshot", "list", "--json", check=True).stdout) if s["vm_name"] == "f-1")
    memory = Path(snap["dir"]) / "memory"
    assert memory.stat().st_blocks * 512 < 1 << 30 and (Path(snap["dir"]) / "vmstate").stat().st_size < 8 << 20
    for g in forks:
        assert sh(n, g, "hostname; cat /root/mark").split() == [g, "from-f-1"]
        assert sh(n, g, f"kill -0 {n.counter} && echo alive") == "alive"
        assert str(memory) in Path(f"/proc/{n.show(g)['pid']}/maps").read_text()
    for g in forks:
        n.run("vm", "delete", g, "--force", check=True, timeout=120)
    assert not Path(snap["dir"]).exists()  # with its last fork
    assert sh(n, "f-1", "cat /root/mark") == "from-f-1"  # f-1 ran on


def test_warm_runs_restore_a_template_in_bridge_mode_with_nat(forked):
    n = forked
    runs = []
    for _ in range(2):
        r = n.run("vm", "run", "--rm", "--nat", *SPEC, "--", "sh", "-c", f"hostname; {GET}", timeout=LONG)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.strip().endswith(UPLINK), r.stdout
        runs.append(next(ln for ln in r.stderr.splitlines() if ln.startswith("spec:")))
    # the first one restores src's template (made by its `vm run`) or, if the key differs,
    # boots and makes one; the second restores
    assert "warm: restores template" in runs[1] and "cold: no template" not in runs[0], runs


def test_deleting_the_source_leaves_the_forks_and_deleting_all_leaves_nothing(forked):
    n = forked
    gone = {v: n.net(v) for v in ("src", *FORKS)}
    n.run("vm", "delete", "src", "--force", check=True, timeout=120)
    for f in FORKS:
        assert sh(n, f, "hostname") == f and sh(n, f, GET).endswith(UPLINK)
    assert [s["kind"] for s in json.loads(n.run("snapshot", "list", "--json", check=True).stdout)].count("fork") == 1
    for f in FORKS:
        n.run("vm", "delete", f, "--force", check=True, timeout=120)
    # the fork snapshot went with the last fork; templates stay (nothing stands on them)
    assert [s for s in json.loads(n.run("snapshot", "list", "--json", check=True).stdout) if s["kind"] != "template"] == []
    n.run("image", "warm", "--rm", check=True)
    assert json.loads(n.run("snapshot", "list", "--json", check=True).stdout) == []
    assert json.loads(n.run("vm", "list", "--json", check=True).stdout) == []
    assert [p for p in (n.env.state_dir / "snapshots").iterdir()] == []
    assert list((n.env.state_dir / "vms").iterdir()) == []
    assert not list(n.env.memory_dir.glob("*"))
    for v, d in gone.items():
        assert not [r for r in n.rules() if d["tap"] in r or f"{d['address']}/32" in r], v
        assert n.dns(f"{v}.vm")[0] == "NXDOMAIN"
    assert all(t.startswith("tap-pool-") for t in n.taps()), n.taps()
    assert json.loads(n.run("daemon", "status", "--json", check=True).stdout)["services"]["network"]["leases"] == 0
