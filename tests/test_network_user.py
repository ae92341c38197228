"""User-mode networking (QEMU's slirp) with real guests, inside namespaces this module
makes (the network safety rule): the daemon runs in ``host``, whose uplink leads to
``internet``, where tests/peer_http.py answers with the address it saw. Nothing is made
on the host for these guests (checked before and after), their listeners are forwarded
to the host's 127.0.0.1 as the agent pushes them, and a daemon running as an
unprivileged user (made here) runs one too.

Boots: two VMs at once (root's daemon), one VM of the unprivileged daemon; one fork of two.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import guest_assets as ga
from conftest import BANGER, isolated_env, wait_for
from netns import Netns, delete_vms_and_stop, uplinked
from oci_fixtures import missing_tools, push_layers
from test_agent_anyimage import busybox_layer

LONG = 1800
ARGS = ["--image", "nopy-micro", "--vcpu", "1", "--memory", "256M", "--network", "user"]
INTERNET = "10.98.0.2"
UPLINK = "10.98.0.1"
GET = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {INTERNET} 8080"
PEER = str(Path(__file__).with_name("peer_http.py"))
USER = "banger-t-unpriv"

pytestmark = [
    pytest.mark.oci,
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_tools()), reason=f"needs {missing_tools()} (scripts/install.sh installs them)"),
]


class UserEnv:
    def __init__(self, env, host: Netns, inet: Netns) -> None:
        self.env, self.host, self.inet = env, host, inet

    def run(self, *args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
        r = subprocess.run(self.host.argv([BANGER, *args]), env=self.env.env(), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"banger {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def net(self, name: str) -> dict:
        return json.loads(self.run("vm", "show", name, "--json", check=True).stdout)["fields"]["network"]

    def ex(self, name: str, cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run("vm", "exec", name, "--", "sh", "-c", cmd, timeout=timeout)

    def ports(self, name: str) -> dict[tuple[str, int], str]:
        rows = json.loads(self.run("vm", "ports", name, "--json", "--no-probe", check=True).stdout)
        return {(p["proto"], p["port"]): p["endpoint"] for p in rows}

    def forwards(self, name: str) -> dict[str, dict]:
        return {f["guest"]: f for f in self.net(name).get("forwards", [])}

    def host_state(self) -> dict:
        """What a VM could have changed in the daemon's namespace."""
        links = sorted((lk["ifname"], lk.get("linkinfo", {}).get("info_kind", "")) for lk in self.host.links())
        addrs = json.loads(self.host.run(["ip", "-j", "addr"], check=True).stdout)
        for link in addrs:  # an IPv6 link-local address still in duplicate detection is the same address
            for a in link.get("addr_info", []):
                a.pop("tentative", None)
        fwd = self.host.run(["sysctl", "-n", "net.ipv4.ip_forward"], check=True).stdout
        return {
            "links": links,
            "addrs": addrs,
            "rules": [ln for ln in self.host.iptables_save().splitlines() if not ln.startswith("#")],
            "fwd": fwd,
        }

    def get(self, port: int, path: str = "/") -> str:
        """An HTTP GET to 127.0.0.1:PORT from inside the daemon's namespace."""
        code = f"""
            import urllib.request
            print(urllib.request.urlopen("http://127.0.0.1:{port}{path}", timeout=10).read().decode(), end="")
        """
        return self.host.python(code).stdout

    def bound(self, port: int, proto: str = "tcp") -> bool:
        """Whether something in the daemon's namespace holds 127.0.0.1:PORT."""
        kind = "SOCK_STREAM" if proto == "tcp" else "SOCK_DGRAM"
        code = f"""
            import socket
            s = socket.socket(socket.AF_INET, socket.{kind})
            if s.type == socket.SOCK_STREAM:  # a TIME_WAIT left by the tests' own GETs is not a listener
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", {port}))
                print("free")
            except OSError:
                print("bound")
        """
        return self.host.python(code).stdout.strip() == "bound"


@pytest.fixture(scope="module")
def uenv(oci_registry, tmp_path_factory):
    with uplinked("bgt-uhost", "bgt-uinet", UPLINK, INTERNET) as (host, inet):
        pushed = push_layers(oci_registry, "banger/userbusybox", "1", [busybox_layer()], tmp_path_factory.mktemp("uimg"))
        with isolated_env() as env:
            env.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
            env.write_config(
                "[vmm]\naccel = 'tcg'\nstop_timeout_s = 30\n[network.forward]\nexclude = ['tcp/6060']\npin = { '9090' = 19090 }\n"
            )
            env.run("kernel", "pull", "microvm-6.1", check=True, timeout=LONG)
            env.run(
                "image", "pull", pushed["ref"], "--name", "nopy-micro", "--kernel-ref", "microvm-6.1", check=True, timeout=600
            )
            env.stop_daemon()
            env.extra_env["BANGER_NETNS"] = host.name
            u = UserEnv(env, host, inet)
            u.run("daemon", "start", check=True)
            yield u
            delete_vms_and_stop(u.run)


@pytest.fixture(scope="module")
def pair(uenv):
    """u1 and u2, user mode, created at once; the namespace's state from before."""
    before = uenv.host_state()
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(uenv.run, "vm", "create", "--name", n, *ARGS, timeout=600) for n in ("u1", "u2")]
        results = [f.result() for f in futs]
    for r in results:
        assert r.returncode == 0, r.stdout + r.stderr
    uenv.before = before
    return uenv


def test_user_mode_goes_out_with_nothing_made_on_the_host(pair):
    u = pair
    assert u.host_state() == u.before  # no TAP, bridge, address, rule or sysctl for two running VMs
    n = u.net("u1")
    assert n["mode"] == "user" and n["address"] == "10.0.2.15" and n["user_net"] == "10.0.2.0/24" and "tap" not in n
    r = u.ex("u1", f"ip -4 addr show eth0; ip route; {GET}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "inet 10.0.2.15/24" in r.stdout and "default via 10.0.2.2" in r.stdout
    assert r.stdout.strip().endswith(UPLINK)  # slirp's connection leaves from the daemon's namespace
    # the host's loopback services, at the slirp gateway
    loop = subprocess.Popen(u.host.argv([sys.executable, PEER, "127.0.0.1", "18555"]))
    try:
        wait_for(lambda: u.bound(18555), timeout=10)
        r = u.ex("u2", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 10.0.2.2 18555")
        assert r.returncode == 0 and r.stdout.strip().endswith("127.0.0.1"), r.stdout + r.stderr
    finally:
        loop.kill()
    doctor = u.run("doctor").stdout
    assert "user mode" in doctor and "127.0.0.1 services at 10.0.2.2" in doctor, doctor


def _unserve(u: UserEnv, vm: str, port: int) -> None:
    """Kill what listens on the guest's TCP ``port`` (busybox has no pkill)."""
    rows = json.loads(u.run("vm", "ports", vm, "--json", "--no-probe", check=True).stdout)
    pids = {p["pid"] for p in rows if p["proto"] == "tcp" and p["port"] == port}
    assert pids and None not in pids, rows
    assert u.ex(vm, "kill " + " ".join(map(str, pids))).returncode == 0


def _serve(u: UserEnv, vm: str, port: str, body: str) -> None:
    r = u.ex(vm, f"mkdir -p /tmp/w{port} && echo {body} > /tmp/w{port}/index.html && httpd -p {port} -h /tmp/w{port}")
    assert r.returncode == 0, r.stdout + r.stderr


def test_listeners_are_forwarded_to_loopback_as_they_come_and_go(pair):
    u = pair
    _serve(u, "u1", "8080", "one")
    t0 = time.monotonic()
    wait_for(lambda: u.ports("u1").get(("tcp", 8080)) == "127.0.0.1:8080", timeout=15, interval=0.2)
    seen = time.monotonic() - t0  # reported only: latency is benchmarks/port_forward.py's to measure
    assert u.get(8080) == "one\n"
    # the same guest port in a second VM: another host port
    _serve(u, "u2", "8080", "two")
    wait_for(lambda: ("tcp", 8080) in u.ports("u2") and u.ports("u2")[("tcp", 8080)] != "guest:8080", timeout=15)
    other = u.ports("u2")[("tcp", 8080)]
    assert other.startswith("127.0.0.1:") and other != "127.0.0.1:8080"
    assert u.get(int(other.split(":")[1])) == "two\n" and u.get(8080) == "one\n"
    # pinned, excluded, guest-loopback and UDP listeners
    _serve(u, "u1", "9090", "pinned")
    _serve(u, "u1", "6060", "excluded")
    _serve(u, "u1", "127.0.0.1:7070", "private")
    # a UDP listener busybox has: its DHCP server (port 67, daemonizes itself)
    conf = "interface eth0\\nstart 10.0.2.100\\nend 10.0.2.110\\n"
    r = u.ex("u1", f"printf '{conf}' > /tmp/udhcpd.conf && touch /tmp/udhcpd.leases && udhcpd -S /tmp/udhcpd.conf")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        wait_for(lambda: {"tcp/9090", "tcp/6060", "tcp/7070", "udp/67"} <= set(u.forwards("u1")), timeout=15)
    except AssertionError:
        raise AssertionError(f"{u.forwards('u1')}\n{u.ports('u1')}") from None
    fw = u.forwards("u1")
    assert fw["tcp/8080"]["host"] == "127.0.0.1:8080" and fw["tcp/9090"]["host"] == "127.0.0.1:19090"
    assert fw["tcp/6060"]["host"] is None and "exclude" in fw["tcp/6060"]["why"]
    # a listener on the guest's loopback (a dev server on localhost): relayed through the agent
    assert fw["tcp/7070"] == {"guest": "tcp/7070", "host": "127.0.0.1:7070", "via": "agent"}
    assert u.get(7070) == "private\n" and u.ports("u1")[("tcp", 7070)] == "127.0.0.1:7070"
    assert fw["udp/67"]["host"] == "127.0.0.1:67" and u.bound(67, "udp")
    assert u.get(19090) == "pinned\n" and not u.bound(6060)
    ports = u.ports("u1")
    assert ports[("tcp", 6060)] == "guest:6060" and ports[("tcp", 9090)] == "127.0.0.1:19090"
    # a listener that goes takes its forward with it
    _unserve(u, "u1", 8080)
    t0 = time.monotonic()
    wait_for(lambda: "tcp/8080" not in u.forwards("u1") and not u.bound(8080), timeout=15, interval=0.2)
    gone = time.monotonic() - t0
    assert u.ports("u2")[("tcp", 8080)] == other  # the other VM's is untouched
    print(f"forward seen after {seen:.2f}s, removal after {gone:.2f}s (CLI round trips included)")


def test_a_restarted_daemon_adopts_the_forwards_of_running_vms(pair):
    u = pair
    _serve(u, "u2", "8181", "again")
    wait_for(lambda: "tcp/8181" in u.forwards("u2"), timeout=15)
    before = u.forwards("u2")
    u.run("daemon", "stop", check=True, timeout=60)
    u.run("daemon", "start", check=True)
    assert u.forwards("u2") == before  # from the table: the VMM kept them, nothing was re-added
    assert u.get(int(before["tcp/8181"]["host"].split(":")[1])) == "again\n"
    _unserve(u, "u2", 8181)
    wait_for(lambda: "tcp/8181" not in u.forwards("u2"), timeout=15)  # the new daemon watches again


def test_forks_get_their_own_forwards(pair):
    """`vm fork` (restores of one snapshot): each fork's new QEMU forwards every listener
    it inherited, on host ports of its own."""
    u = pair
    _serve(u, "u2", "8282", "snap")
    wait_for(lambda: "tcp/8282" in u.forwards("u2"), timeout=15)
    made = json.loads(u.run("vm", "fork", "u2", "--count", "2", "--name", "u3", "--json", check=True, timeout=300).stdout)
    forks = [v["name"] for v in made["vms"]]
    assert forks == ["u3-1", "u3-2"]
    try:
        wait_for(lambda: all("tcp/8282" in u.forwards(f) for f in forks), timeout=15)
        hosts = {vm: u.forwards(vm)["tcp/8282"]["host"] for vm in ["u2", *forks]}
        assert len(set(hosts.values())) == 3, hosts
        for f in forks:
            assert u.get(int(hosts[f].split(":")[1])) == "snap\n"
            assert set(u.forwards(f)) == set(u.forwards("u2"))  # every listener it inherited
    finally:
        for f in forks:
            u.run("vm", "delete", f, "--force", check=True, timeout=120)
    assert json.loads(u.run("snapshot", "list", "--json", check=True).stdout) == []  # went with the last fork
    for f in forks:
        assert not u.bound(int(hosts[f].split(":")[1]))  # its forwards went with it


def test_deleting_user_mode_vms_leaves_nothing(pair):
    u = pair
    held = [(g.split("/")[0], f["host"]) for vm in ("u1", "u2") for g, f in u.forwards(vm).items() if f["host"]]
    assert len(held) >= 3, held
    for vm in ("u1", "u2"):
        u.run("vm", "delete", vm, "--force", check=True, timeout=120)
    assert u.host_state() == u.before
    for proto, h in held:
        assert not u.bound(int(h.split(":")[1]), proto), (proto, h)
    with sqlite3.connect(u.env.state_dir / "banger.db") as db:
        assert db.execute("select count(*) from network_forwards").fetchone() == (0,)


# --- an unprivileged daemon ------------------------------------------------------------


@pytest.fixture
def unprivileged(uenv, tmp_path_factory):
    """A user made for the test (removed after), a directory it owns, and a kernel and
    rootfs it can read (copies of what root's daemon pulled)."""
    made = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
        made = True
    pw = pwd.getpwnam(USER)
    home = Path(subprocess.run(["mktemp", "-d", "/tmp/bgu-XXXXXX"], capture_output=True, text=True, check=True).stdout.strip())
    try:
        image = json.loads(uenv.run("image", "show", "nopy-micro", "--json", check=True).stdout)
        kernel = json.loads(uenv.run("kernel", "show", "microvm-6.1", "--json", check=True).stdout)
        shutil.copy(image["rootfs"], home / "rootfs.ext4")
        shutil.copy(kernel["kernel"], home / "vmlinux")
        for p in [home, *home.iterdir()]:
            os.chown(p, pw.pw_uid, pw.pw_gid)
        yield pw, home, image.get("init")
    finally:
        subprocess.run(["pkill", "-9", "-u", USER], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
        memory = Path(f"/dev/shm/banger-{pw.pw_uid}")  # its daemon's default memory dir
        ram = list(memory.glob("*")) if memory.is_dir() else []
        shutil.rmtree(memory, ignore_errors=True)
        if made:
            subprocess.run(["userdel", USER], capture_output=True)
    assert not ram, f"guest RAM files left: {ram}"


def test_an_unprivileged_daemon_runs_a_user_mode_vm(uenv, unprivileged):
    pw, home, init = unprivileged
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "NO_COLOR": "1",
        "BANGER_CONFIG_DIR": str(home / "cfg"),
        "BANGER_STATE_DIR": str(home / "state"),
        "BANGER_CACHE_DIR": str(home / "cache"),
        "BANGER_RUNTIME_DIR": str(home / "run"),
        "BANGER_NETNS": uenv.host.name,
    }
    (home / "cfg").mkdir()
    (home / "cfg" / "config.toml").write_text("[vmm]\naccel = 'tcg'\nstop_timeout_s = 30\n")
    os.chown(home / "cfg", pw.pw_uid, pw.pw_gid)
    as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--inh-caps=-all"]

    def banger(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            uenv.host.argv([*as_user, BANGER, *args]), env=env, capture_output=True, text=True, timeout=timeout, cwd=home
        )

    before = uenv.host_state()
    init_args = ["--init", init] if init else []
    r = banger("image", "register", "mine", "--rootfs", str(home / "rootfs.ext4"), "--kernel", str(home / "vmlinux"), *init_args)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        doctor = banger("doctor").stdout
        assert "auto = user on QEMU" in doctor, doctor  # no TAPs for this user: auto picks user mode
        # Firecracker has no user mode: refused by name, and auto does not pick it there
        r = banger("vm", "create", "--name", "fc", "--image", "mine", "--driver", "firecracker", "--network", "user")
        assert r.returncode != 0 and "firecracker VMM has no user-mode networking" in r.stderr, r.stderr
        r = banger("vm", "create", "--name", "fc", "--image", "mine", "--driver", "firecracker")
        assert r.returncode != 0 and "user-mode" not in r.stderr and "firecracker" in r.stderr.lower(), r.stderr
        assert "fc" not in banger("vm", "list").stdout
        # the default network here: user mode
        r = banger("vm", "create", "--name", "mine", "--image", "mine", "--vcpu", "1", "--memory", "256M")
        assert r.returncode == 0, r.stdout + r.stderr + banger("vm", "logs", "mine", "-n", "0").stdout[-3000:]
        r = banger("vm", "exec", "mine", "--", "sh", "-c", f"id -u; stat -c %u /root; grep -c ' /root ' /proc/mounts; {GET}")
        assert r.returncode == 0 and r.stdout.split()[:3] == ["0", "0", "1"], r.stdout + r.stderr  # /root: the work disk, root's
        assert r.stdout.strip().endswith(UPLINK), r.stdout + r.stderr
        show = json.loads(banger("vm", "show", "mine", "--json").stdout)
        assert show["fields"]["network"]["mode"] == "user"
        qemu = subprocess.run(["pgrep", "-u", USER, "-f", "qemu-system"], capture_output=True, text=True).stdout.split()
        assert qemu, "the VM's QEMU runs as the unprivileged user"
        assert banger("vm", "delete", "mine", "--force").returncode == 0
    finally:
        banger("daemon", "stop", timeout=60)
    assert uenv.host_state() == before
