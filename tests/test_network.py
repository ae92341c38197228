"""Bridge networking, NAT and `<name>.vm` DNS with real guests, all inside network
namespaces this module makes (the network safety rule): the daemon runs in ``host``,
whose uplink (a veth) leads to ``internet``, where a small HTTP server answers with the
address it saw. The busybox-only image on the microVM kernel keeps boots short.

Boots: two VMs created at once (parallel creates get distinct addresses), three
stop/start cycles of one of them (NAT rules stay one set), one restore (not a boot).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

import guest_assets as ga
from conftest import BANGER, isolated_env, make_dist, wait_for
from netns import Netns, delete_vms_and_stop, uplinked
from oci_fixtures import missing_tools, push_layers
from test_agent_anyimage import busybox_layer

LONG = 1800
ARGS = ["--image", "nopy-micro", "--vcpu", "1", "--memory", "256M"]
INTERNET = "10.99.0.2"
UPLINK = "10.99.0.1"
# busybox's static wget crashes in its resolver code: plain HTTP over nc instead
GET = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {INTERNET} 8080"

pytestmark = [
    pytest.mark.oci,
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_tools()), reason=f"needs {missing_tools()} (scripts/install.sh installs them)"),
]

# A plugin that fails prepare_host for VMs named fail-*, after network, NAT and DNS
# prepared theirs (requires both): what they made must all go.
FAILER = """
from banger_core import hookimpl

requires = ["dns", "nat"]


@hookimpl
def prepare_host(ctx):
    if ctx.vm.name.startswith("fail-"):
        raise RuntimeError("injected failure after network, nat and dns")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NetEnv:
    def __init__(self, env, host: Netns, inet: Netns, dns_port: int) -> None:
        self.env, self.host, self.inet, self.dns_port = env, host, inet, dns_port

    def run(self, *args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
        r = subprocess.run(self.host.argv([BANGER, *args]), env=self.env.env(), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"banger {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def show(self, name: str) -> dict:
        return json.loads(self.run("vm", "show", name, "--json", check=True).stdout)

    def net(self, name: str) -> dict:
        return self.show(name)["fields"]["network"]

    def ex(self, name: str, cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run("vm", "exec", name, "--", "sh", "-c", cmd, timeout=timeout)

    def dns(self, qname: str, qtype: str = "A", tcp: bool = False) -> tuple[str, list[str]]:
        code = f"""
            import dnslib, json
            q = dnslib.DNSRecord.question({qname!r}, {qtype!r})
            r = dnslib.DNSRecord.parse(q.send("127.0.0.1", {self.dns_port}, tcp={tcp}, timeout=5))
            print(json.dumps([dnslib.RCODE[r.header.rcode], [str(a.rdata) for a in r.rr]]))
        """
        rcode, answers = json.loads(self.host.python(code).stdout)
        return rcode, answers

    def rules(self) -> list[str]:
        return [ln for ln in self.host.iptables_save().splitlines() if ln.startswith("-A")]

    def taps(self) -> set[str]:
        return {n for n in self.host.link_names() if n.startswith(("bt-", "tap-pool-"))}


@pytest.fixture(scope="module")
def net(oci_registry, tmp_path_factory):
    with uplinked("bgt-host", "bgt-inet", UPLINK, INTERNET) as (host, inet):
        # count what reaches the internet from the guests' subnet, NATed or not
        inet.run(["iptables", "-A", "INPUT", "-i", "wan0", "-s", "172.30.0.0/24"], check=True)
        pushed = push_layers(oci_registry, "banger/netbusybox", "1", [busybox_layer()], tmp_path_factory.mktemp("netimg"))
        plugdir = tmp_path_factory.mktemp("failer")
        make_dist(plugdir, "banger-failer", "failer", FAILER)
        with isolated_env() as env:
            env.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
            env.extra_path.append(str(plugdir))
            dns_port = free_port()
            env.write_config(f"[vmm]\naccel = 'tcg'\nstop_timeout_s = 30\n[dns]\nport = {dns_port}\n[network]\ntap_pool = 2\n")
            # pulls need the registry on the host's loopback: a daemon outside the namespace,
            # which changes no network (BANGER_NETNS=none), pulls; then the real one starts inside
            env.run("kernel", "pull", "microvm-6.1", check=True, timeout=LONG)
            env.run(
                "image", "pull", pushed["ref"], "--name", "nopy-micro", "--kernel-ref", "microvm-6.1", check=True, timeout=600
            )
            env.run("image", "pull", pushed["ref"], "--name", "nopy-cloud", check=True, timeout=LONG)  # Debian's cloud kernel
            env.stop_daemon()
            env.extra_env["BANGER_NETNS"] = host.name
            n = NetEnv(env, host, inet, dns_port)
            n.run("daemon", "start", check=True)
            yield n
            delete_vms_and_stop(n.run)


@pytest.fixture(scope="module")
def pair(net):
    """alpha (with --nat; the microVM kernel configures eth0 from ip=) and beta (without;
    Debian's cloud kernel has no IP autoconfiguration: the agent applies banger.net=),
    created at once."""
    cloud = ["--image", "nopy-cloud", *ARGS[2:]]
    with ThreadPoolExecutor(2) as pool:
        futs = [
            pool.submit(net.run, "vm", "create", "--name", "alpha", "--nat", *ARGS, timeout=600),
            pool.submit(net.run, "vm", "create", "--name", "beta", *cloud, timeout=600),
        ]
        results = [f.result() for f in futs]
    for r in results:
        assert r.returncode == 0, r.stdout + r.stderr
    return net


def test_guests_on_the_bridge_reach_each_other_and_resolve_by_name(pair):
    net = pair
    a, b = net.net("alpha"), net.net("beta")
    assert a["mode"] == b["mode"] == "bridge"
    assert a["address"] != b["address"] and a["mac"] != b["mac"]  # parallel creates: distinct leases
    assert a["tap"].startswith("bt-") and a["tap"] in net.taps()
    r = net.ex("alpha", f"ping -c 1 -W 5 {b['address']} && hostname && ip -4 addr show eth0")
    assert r.returncode == 0, (
        r.stdout
        + r.stderr
        + net.run("vm", "logs", "beta", "-n", "0").stdout[-3000:]
        + net.ex("beta", "ip addr; ip link; lsmod; cat /proc/cmdline").stdout
    )
    assert "alpha" in r.stdout.split() and f"inet {a['address']}/24" in r.stdout
    r = net.ex("beta", f"hostname; ip -4 addr show eth0; ip route; cat /etc/resolv.conf; ping -c 1 -W 5 {a['address']}")
    assert r.returncode == 0 and r.stdout.split()[0] == "beta", r.stdout + r.stderr
    assert f"inet {b['address']}/24" in r.stdout and "default via 172.30.0.1" in r.stdout
    assert "network:" in net.run("vm", "logs", "beta", "-n", "0").stdout  # the agent said what it applied
    # DNS, from the host side, through the daemon's server (UDP and TCP)
    assert net.dns("alpha.vm") == ("NOERROR", [a["address"]])
    assert net.dns("BETA.vm", tcp=True) == ("NOERROR", [b["address"]])
    assert net.dns("nosuch.vm")[0] == "NXDOMAIN"
    assert net.dns("example.com")[0] == "REFUSED"
    # a listener on port 22 shows as <name>.vm:22
    assert net.ex("alpha", "mkdir -p /tmp/www && httpd -p 22 -h /tmp/www").returncode == 0
    ports = json.loads(net.run("vm", "ports", "alpha", "--json", check=True).stdout)
    assert any(p["endpoint"] == "alpha.vm:22" for p in ports), ports
    status = json.loads(net.run("daemon", "status", "--json", check=True).stdout)["services"]
    assert status["dns"]["listen"] == f"127.0.0.1:{net.dns_port}", status
    assert status["network"]["bridge"] == "banger0"
    # the pool refills in the background after the two creates took from it
    wait_for(lambda: len([t for t in net.taps() if t.startswith("tap-pool-")]) == 2, timeout=15)


def test_ssh_name_vm_goes_straight_to_a_bridge_vms_address(pair):
    """`ssh NAME.vm`'s ProxyCommand (`vm ssh-proxy`) connects to a bridge VM's address,
    not through the agent: the guest's port-22 server sees the bridge's address as the
    peer. (A busybox httpd CGI on port 22 says what peer it saw; no sshd needed.)"""
    net = pair
    script = (
        "mkdir -p /tmp/www/cgi-bin && cat > /tmp/www/cgi-bin/peer <<'EOF'\n"
        '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "peer=$REMOTE_ADDR"\nEOF\n'
        "chmod 755 /tmp/www/cgi-bin/peer && { netstat -ltn | grep -q ':22 ' || httpd -p 22 -h /tmp/www; }"
    )
    r = net.ex("alpha", script)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        net.host.argv([BANGER, "vm", "ssh-proxy", "alpha.vm"]),
        env=net.env.env(),
        input=b"GET /cgi-bin/peer HTTP/1.0\r\n\r\n",
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    peer = r.stdout.split(b"peer=", 1)[-1].strip()  # busybox httpd listens on v6: a v4 peer is mapped
    assert peer in (b"172.30.0.1", b"[::ffff:172.30.0.1]"), (r.stdout, r.stderr)


def test_nat_reaches_the_internet_and_only_with_nat(pair):
    net = pair
    before = _counted(net)
    r = net.ex("alpha", GET)
    assert r.returncode == 0 and r.stdout.strip().endswith(UPLINK), r.stdout + r.stderr  # masqueraded: the uplink's address
    assert _counted(net) == before  # nothing from 172.30.0.0/24 arrived unmasqueraded
    r = net.ex("beta", GET)
    assert not r.stdout.strip().endswith(UPLINK), r.stdout
    assert _counted(net) == before  # beta's packets never left the uplink


def _counted(net) -> int:
    out = net.inet.run(["iptables", "-L", "INPUT", "-v", "-x", "-n"], check=True).stdout
    line = next(ln for ln in out.splitlines() if "172.30.0.0/24" in ln)
    return int(line.split()[0])


def _vm_rules(net, name: str) -> list[str]:
    d = net.net(name)
    return [r for r in net.rules() if d["tap"] in r or f"{d['address']}/32" in r]


def test_stop_start_keeps_one_set_of_rules_and_the_address(pair):
    net = pair
    addr = net.net("alpha")["address"]
    for _ in range(3):
        net.run("vm", "stop", "alpha", check=True, timeout=120)
        assert _vm_rules(net, "alpha") == []
        assert net.dns("alpha.vm")[0] == "NXDOMAIN"  # gone with the VM
        net.run("vm", "start", "alpha", check=True, timeout=600)
    rules = _vm_rules(net, "alpha")
    assert len([r for r in rules if "MASQUERADE" in r]) == 1 and len([r for r in rules if r.startswith("-A FORWARD")]) == 2, rules
    assert net.net("alpha")["address"] == addr
    assert net.dns("alpha.vm") == ("NOERROR", [addr])


def test_a_restored_vm_gets_its_own_mac_and_address(pair):
    net = pair
    net.run("vm", "snapshot", "beta", "--name", "beta-s", check=True, timeout=300)
    net.run("vm", "restore", "beta-s", "--name", "delta", check=True, timeout=300)
    b, d = net.net("beta"), net.net("delta")
    assert d["address"] != b["address"] and d["mac"] != b["mac"]
    r = net.ex("delta", "ip -4 addr show eth0; ip link show eth0; hostname")
    assert f"inet {d['address']}/24" in r.stdout and b["address"] not in r.stdout, r.stdout
    assert d["mac"] in r.stdout and "delta" in r.stdout.split()
    assert net.dns("delta.vm") == ("NOERROR", [d["address"]])
    assert net.ex("delta", f"ping -c 1 -W 5 {net.net('alpha')['address']}").returncode == 0
    net.run("vm", "delete", "delta", "--force", check=True, timeout=120)
    net.run("snapshot", "delete", "beta-s", check=True)


def test_a_failed_create_after_network_nat_and_dns_leaves_nothing(pair):
    net = pair
    taps, rules = net.taps(), net.rules()
    r = net.run("vm", "create", "--name", "fail-1", "--nat", *ARGS, timeout=300)
    assert r.returncode != 0 and "injected failure" in r.stderr
    assert {t for t in net.taps() if t.startswith("bt-")} == {t for t in taps if t.startswith("bt-")}
    assert net.rules() == rules
    assert "fail-1" not in net.run("vm", "list").stdout
    assert net.dns("fail-1.vm")[0] == "NXDOMAIN"
    # --nat with --network none is refused, and leaves nothing either
    r = net.run("vm", "create", "--name", "nonat", "--nat", "--network", "none", *ARGS, timeout=300)
    assert r.returncode != 0 and "network" in r.stderr and "none" in r.stderr, r.stderr
    assert "nonat" not in net.run("vm", "list").stdout


def test_rules_go_after_kill_9_of_the_daemon_with_handles_lost(pair):
    net = pair
    d = net.net("alpha")
    assert _vm_rules(net, "alpha")
    pid = net.env.daemon_pid()
    subprocess.run(["kill", "-9", str(pid)], check=True)
    wait_for(lambda: subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0, timeout=10)
    for handles in net.env.state_dir.rglob("handles.json"):
        handles.write_text("{truncated")
    pool = {t for t in net.taps() if t.startswith("tap-pool-")}
    net.run("daemon", "start", check=True)
    # the new daemon rebuilt the records of the running VMs and adopted the pool
    assert net.dns("alpha.vm") == ("NOERROR", [d["address"]])
    assert {t for t in net.taps() if t.startswith("tap-pool-")} == pool and len(pool) == 2
    net.run("vm", "delete", "alpha", "--force", check=True, timeout=120)
    assert [r for r in net.rules() if d["tap"] in r or f"{d['address']}/32" in r] == []
    assert d["tap"] not in net.taps()
    # the mode is a per-VM option, changed on a stopped VM
    net.run("vm", "stop", "beta", check=True, timeout=120)
    net.run("vm", "set", "beta", "--network", "none", check=True)
    assert net.show("beta")["options"]["network"] == {"network": "none"}
    r = net.run("vm", "set", "beta", "--network", "wifi")
    assert r.returncode != 0 and "'auto', 'bridge', 'user' or 'none'" in r.stderr, r.stderr
    net.run("vm", "delete", "beta", "--force", check=True, timeout=120)
    # every VM gone: only pool TAPs remain, no rule names a VM, no lease is left
    wait_for(lambda: all(t.startswith("tap-pool-") for t in net.taps()), timeout=10)
    assert not [r for r in net.rules() if re.search(r"banger:[0-9a-f]{6,}", r) or "bt-" in r]
    assert json.loads(net.run("daemon", "status", "--json", check=True).stdout)["services"]["network"]["leases"] == 0


def test_doctor_says_what_auto_picks_and_daemon_stop_drains_the_pool(net):
    doc = net.run("doctor").stdout
    assert re.search(r"network: mode\s+mode auto; auto = bridge \(CAP_NET_ADMIN", doc), doc
    assert re.search(r"network: bridge\s+banger0 172\.30\.0\.1/24, up", doc), doc
    net.run("daemon", "start", check=True)
    wait_for(lambda: len(net.taps()) == 2, timeout=15)
    net.run("daemon", "stop", check=True)
    assert net.taps() == set()  # drained
    assert "banger0" in net.host.link_names()  # the bridge stays
