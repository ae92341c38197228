"""The nat plugin's hooks for real, inside network namespaces these tests make (never the
host's own): its rules, its cleanup by record and by comment, reconcile, ip_forward, the
trust rule and the refusals, and one real packet masqueraded from a "guest" namespace.

No VM boots: the core's ``Lifecycle`` runs the stages around a no-op boot, with a stand-in
``net`` plugin whose service answers a VMNet for a bridge and TAP made in the namespace.
"""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from netns import Netns

BRIDGE, BRIDGE_ADDR, UPLINK = "bgbr0", "10.77.0.1/24", "up0"
# the network plugin's bridge-wide DROP, as it appends it (its comment shares banger's tag)
ISOLATION = ["-i", BRIDGE, "!", "-o", BRIDGE, "-m", "comment", "--comment", "banger:bridge-isolation", "-j", "DROP"]
ISOLATION_SAVED = f'-A FORWARD -i {BRIDGE} ! -o {BRIDGE} -m comment --comment "banger:bridge-isolation" -j DROP'

# Runs first inside every namespace: the plugin host (a fake network plugin + nat), a real
# store with nat's migrations, the services registered as the daemon does, and helpers.
PRELUDE = """
import json, logging, subprocess, tempfile
from pathlib import Path
from types import SimpleNamespace

import banger_nat
from banger_core import hookimpl, hostnet as h
from banger_core.config import Config
from banger_core.context import CleanupReason, ReconcileContext
from banger_core.errors import BangerError
from banger_core.models import Machine, VMState
from banger_core.paths import Paths
from banger_core.plugins import PluginHost
from banger_core.runtime import Runtime
from banger_core.store import Store
from banger_core.testing import sample_vm
from banger_core.vm.stages import Lifecycle
from banger_network.api import VMNet

BRIDGE = "bgbr0"


class FakeNetwork:
    provides = ["net"]

    def __init__(self):
        self.nets = {}

    @hookimpl
    def register_services(self, register):
        register("net", self)

    def vm_network(self, vm):
        return self.nets.get(vm.id)


def make(nat=None, root=None):
    root = Path(root or tempfile.mkdtemp(prefix="nat-"))
    net = FakeNetwork()
    host = PluginHost()
    host.add(net, "network")
    host.add(banger_nat, "nat")
    host.finish_loading()
    paths = Paths(root / "cfg", root / "state", root / "cache", root / "run")
    rt = Runtime(paths=paths, config=Config(path=root / "cfg" / "config.toml", tables={"nat": nat or {}}), host=host,
                 order=host.order())
    store = Store(root / "state" / "banger.db")
    assert host.register_migrations(store) == []
    assert host.register_services(SimpleNamespace(runtime=rt, store=store)) == []
    return SimpleNamespace(rt=rt, net=net, store=store, root=root)


def vm_for(env, name="web", nat=None, address="10.77.0.5", tap="bt-web", mode="bridge", project_dir=None):
    vm = sample_vm(name, project_dir=project_dir, options={"nat": {"nat": nat}} if nat is not None else {})
    env.net.nets[vm.id] = None if mode == "none" else VMNet(
        vm.id, name, mode, bridge=BRIDGE if mode == "bridge" else None, tap=tap if mode == "bridge" else None,
        mac="52:54:00:00:00:05", address=address if mode == "bridge" else None, prefixlen=24, gateway="10.77.0.1")
    return vm


def start(env, vm, boot=None):
    lc = Lifecycle(env.rt, vm, op_id="op-test")
    lc.start(Machine(kernel="/dev/null", vcpus=1, memory_mib=512), boot or (lambda _m: None))
    return lc


def start_error(env, vm):
    try:
        start(env, vm)
    except BangerError as exc:
        return exc.message
    return None


def save():
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout


def mine(vm):
    return [ln for ln in save().splitlines() if f"banger:nat:{vm.id}" in ln]


def forward():
    return [ln for ln in save().splitlines() if ln.startswith("-A FORWARD")]


def fwd():
    return h.sysctl_get("net.ipv4.ip_forward")


def reconcile(env):
    banger_nat.reconcile(ctx=ReconcileContext(
        plugin="nat", paths=env.rt.paths, store=env.store, settings=env.rt.config.settings_for(env.rt.host, "nat"),
        log=logging.getLogger("t"), service=lambda cap: env.rt.host.service_for("nat", cap)))


def out(**kw):
    print(json.dumps(kw))
"""


@pytest.fixture
def ns():
    """A namespace with the bridge, a TAP on it, an uplink holding the default route, and
    the network plugin's bridge-wide DROP appended to FORWARD (what NAT must precede)."""
    n = Netns.make()
    try:
        n.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        n.run(["ip", "addr", "add", BRIDGE_ADDR, "dev", BRIDGE], check=True)
        n.run(["ip", "link", "set", BRIDGE, "up"], check=True)
        n.run(["ip", "tuntap", "add", "bt-web", "mode", "tap"], check=True)
        n.run(["ip", "link", "set", "bt-web", "master", BRIDGE, "up"], check=True)
        n.run(["ip", "link", "add", UPLINK, "type", "veth", "peer", "name", "up0-peer"], check=True)  # no dummy module here
        n.run(["ip", "link", "set", "up0-peer", "up"], check=True)
        n.run(["ip", "addr", "add", "198.51.100.1/24", "dev", UPLINK], check=True)
        n.run(["ip", "link", "set", UPLINK, "up"], check=True)
        n.run(["ip", "route", "add", "default", "via", "198.51.100.2"], check=True)
        n.run(["iptables", "-A", "FORWARD", *ISOLATION], check=True)
        yield n
    finally:
        n.delete()
    assert not n.exists()


def inside(ns: Netns, code: str, timeout: float = 60) -> dict:
    r = ns.python(PRELUDE + textwrap.dedent(code), timeout=timeout)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_rules_at_the_top_idempotent_across_restarts_and_gone_after_cleanup(ns):
    res = inside(
        ns,
        """
        env = make()
        vm = vm_for(env, nat=True)
        cycles = []
        for _ in range(3):
            lc = start(env, vm)
            cycles.append({"mine": mine(vm), "forward": forward(), "fwd": fwd(), "teardown": dict(vm.teardown["nat"])})
            lc.cleanup(CleanupReason.STOP)
        again = Lifecycle(env.rt, vm, op_id="op-again")
        again.cleanup(CleanupReason.STOP)  # a second cleanup has nothing left to do
        out(cycles=cycles, after=mine(vm), forward=forward(), fwd=fwd(), teardown=vm.teardown["nat"],
            known=sorted(env.rt.host.service("nat").known_vms()), vm_id=vm.id)
        """,
    )
    c = f"banger:nat:{res['vm_id']}"
    for cycle in res["cycles"]:
        assert sorted(cycle["mine"]) == sorted(
            [
                f'-A POSTROUTING -s 10.77.0.5/32 -o {UPLINK} -m comment --comment "{c}" -j MASQUERADE',
                f'-A FORWARD -s 10.77.0.5/32 -i {BRIDGE} -o {UPLINK} -m comment --comment "{c}" -j ACCEPT',
                f"-A FORWARD -d 10.77.0.5/32 -i {UPLINK} -o {BRIDGE} -m conntrack --ctstate RELATED,ESTABLISHED "
                f'-m comment --comment "{c}" -j ACCEPT',
            ]
        )
        # both accepts ahead of the network plugin's DROP, which stays last
        assert [c in ln for ln in cycle["forward"]] == [True, True, False]
        assert cycle["forward"][-1] == ISOLATION_SAVED
        assert cycle["fwd"] == "1"
        td = cycle["teardown"]
        assert (td["uplink"], td["address"], td["bridge"], td["tap"], td["comment"]) == (UPLINK, "10.77.0.5", BRIDGE, "bt-web", c)
        assert len(td["rules"]) == 3 and td["why"] == "--nat"
    assert res["after"] == [] and res["forward"] == [ISOLATION_SAVED]
    assert res["fwd"] == "0"  # a fresh namespace has forwarding off: restored after the last NAT VM
    assert res["teardown"] == {} and res["known"] == []


def test_cleanup_without_a_record_removes_by_comment_and_reconcile_removes_stopped_vms(ns):
    res = inside(
        ns,
        """
        env = make()
        a, b = vm_for(env, "a", nat=True, address="10.77.0.5"), vm_for(env, "b", nat=True, address="10.77.0.6")
        start(env, a)
        lost = Lifecycle(env.rt, a, op_id="op-lost")
        a.teardown["nat"].clear()          # the record lost (or never written in full)
        lost.cleanup(CleanupReason.RECONCILE)
        by_comment = mine(a)

        # a daemon crashed with a and b running; a's VMM died with it, b's still runs
        start(env, a)
        start(env, b)
        foreign = h.Rule("nat", "POSTROUTING", ("-s", "10.77.0.99/32", "-o", "up0", "-m", "comment", "--comment",
                                                "banger:nat:0000111122223333", "-j", "MASQUERADE"))
        h.insert_rule(foreign)             # another banger's VM in the same namespace: not ours to remove
        a.state, b.state = VMState.STOPPED, VMState.RUNNING
        env.store.insert_vm(a)
        env.store.insert_vm(b)
        reconcile(env)
        after = {"a": mine(a), "b": len(mine(b)), "fwd": fwd(), "foreign": "banger:nat:0000111122223333" in save()}
        start(env, a)  # its teardown record still names the rules reconcile removed: a start copes
        restarted = len(mine(a))
        b.state = VMState.STOPPED
        env.store.update_vm(b)
        reconcile(env)
        out(by_comment=by_comment, after=after, restarted=restarted, b_after=mine(b), a_after=len(mine(a)), fwd=fwd(),
            known=sorted(env.rt.host.service("nat").known_vms()), a_id=a.id)
        """,
    )
    assert res["by_comment"] == []
    assert res["after"] == {"a": [], "b": 3, "fwd": "1", "foreign": True}
    assert res["restarted"] == 3
    # a is running again but the store still says stopped (the test never updated it): reconcile takes its rules too
    assert res["b_after"] == [] and res["a_after"] == 0
    # the foreign rule is left alone, so ip_forward stays on: "the last banger NAT rule" has not gone
    assert res["fwd"] == "1"
    assert res["known"] == []


def test_ip_forward_on_for_the_first_nat_vm_restored_after_the_last_and_left_alone_when_on(ns):
    res = inside(
        ns,
        """
        env = make()
        a, b = vm_for(env, "a", nat=True, address="10.77.0.5"), vm_for(env, "b", nat=True, address="10.77.0.6")
        plain = vm_for(env, "plain", address="10.77.0.7")
        seen = [fwd()]
        lp = start(env, plain)
        seen.append(fwd())                 # no NAT VM yet: untouched
        la = start(env, a)
        seen.append(fwd())
        status = env.rt.host.service("nat").status()
        lb = start(env, b)
        la.cleanup(CleanupReason.STOP)
        seen.append(fwd())                 # b still has NAT
        lb.cleanup(CleanupReason.DELETE)
        seen.append(fwd())                 # the last one: restored
        lp.cleanup(CleanupReason.STOP)

        h.sysctl_set("net.ipv4.ip_forward", "1")   # on before banger: left alone
        la = start(env, a)
        on_status = env.rt.host.service("nat").status()
        la.cleanup(CleanupReason.DELETE)
        out(seen=seen, status=status, on_status=on_status, after_on=fwd(), plain=plain.teardown.get("nat"))
        """,
    )
    assert res["seen"] == ["0", "0", "1", "1", "0"]
    assert res["status"] == {"nat_vms": 1, "ip_forward": "set to 1 by banger (was 0)"}
    assert res["on_status"] == {"nat_vms": 1, "ip_forward": "not changed by banger"}
    assert res["after_on"] == "1"
    assert res["plain"] == {}


def test_refusals_and_the_project_trust_rule(ns, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    # a cloned repository asking for egress, and trying to allow itself too
    (proj / "banger.toml").write_text("[nat]\ndefault = true\nallow_projects = true\n")
    res = inside(
        ns,
        f"""
        env = make()
        none = start_error(env, vm_for(env, "quiet", nat=True, mode="none"))
        slirp = vm_for(env, "slirp", nat=True, mode="user")
        lc = start(env, slirp)  # QEMU's user-mode network has egress already: no rules, no refusal
        user = {{"rules": len(mine(slirp)), "left": save().count("banger:nat:")}}
        lc.cleanup(CleanupReason.DELETE)
        refused_vm = vm_for(env, "cloned", project_dir=Path("{proj}"))
        refused = start_error(env, refused_vm)
        left = save().count("banger:nat:")
        no_nat = vm_for(env, "optout", nat=False, project_dir=Path("{proj}"))
        lc = start(env, no_nat)
        no_nat_rules = len(mine(no_nat))
        lc.cleanup(CleanupReason.DELETE)
        fields = banger_nat.vm_fields(ctx=Lifecycle(env.rt, refused_vm, op_id="f").fields_ctx("nat"), detail=True)

        allowed = make(nat={{"allow_projects": True}})
        vm = vm_for(allowed, "trusted", project_dir=Path("{proj}"))
        lc = start(allowed, vm)
        allowed_rules = len(mine(vm))
        allowed_fields = banger_nat.vm_fields(ctx=lc.fields_ctx("nat"), detail=False)
        lc.cleanup(CleanupReason.DELETE)

        users = make(nat={{"default": True}})
        vm = vm_for(users, "mine")
        lc = start(users, vm)
        user_default = {{"rules": len(mine(vm)), "why": vm.teardown["nat"]["why"]}}
        lc.cleanup(CleanupReason.DELETE)
        out(none=none, user=user, refused=refused, left=left, no_nat_rules=no_nat_rules, fields=fields,
            allowed_rules=allowed_rules, allowed_fields=allowed_fields, user_default=user_default, cfg=str(env.rt.config.path))
        """,
    )
    assert res["none"] == (
        "nat: prepare_host: --nat needs the bridge network: VM quiet has network mode none "
        "(a VM with --network none has no network to give egress to)"
    )
    assert res["user"] == {"rules": 0, "left": 0}
    assert res["refused"] == (
        f"nat: prepare_host: {proj}/banger.toml: [nat] default = true asks for outbound NAT, and a project may not give "
        f"its VMs network egress by itself: set [nat] allow_projects = true in {res['cfg']} to let projects do that, "
        "or give this VM --nat (or --no-nat)"
    )
    assert res["left"] == 0 and res["no_nat_rules"] == 0
    assert res["fields"]["nat"] is False and "not allowed" in res["fields"]["why"]
    assert res["allowed_rules"] == 3 and res["allowed_fields"] == {"nat": True}
    assert res["user_default"]["rules"] == 3 and res["user_default"]["why"].startswith("[nat] default = true in ")


def test_a_failure_between_rules_leaves_nothing_behind(ns):
    res = inside(
        ns,
        """
        env = make()
        vm = vm_for(env, nat=True)
        real, calls = h.insert_rule, []

        def flaky(rule, position=1):
            calls.append(rule.chain)
            if len(calls) == 2:
                raise BangerError("operation_failed", "injected: iptables said no")
            return real(rule, position)

        h.insert_rule = flaky
        err = start_error(env, vm)          # the core runs cleanup (failed_start) for the failed start
        h.insert_rule = real
        out(err=err, calls=calls, left=save().count("banger:nat:"), fwd=fwd(), teardown=vm.teardown["nat"],
            known=sorted(env.rt.host.service("nat").known_vms()))
        """,
    )
    assert res["err"] == "nat: prepare_host: injected: iptables said no"
    assert len(res["calls"]) == 2  # one rule made, the second refused
    assert res["left"] == 0 and res["fwd"] == "0" and res["teardown"] == {} and res["known"] == []


def test_cleanup_reports_every_failure_and_keeps_the_record(ns):
    res = inside(
        ns,
        """
        env = make()
        vm = vm_for(env, nat=True)
        lc = start(env, vm)
        real = h.delete_rule

        def broken(rule):
            raise BangerError("operation_failed", f"injected on {rule.chain}")

        h.delete_rule = broken
        try:
            lc.cleanup(CleanupReason.STOP)
            err = None
        except BangerError as exc:
            err = exc.message
        kept = dict(vm.teardown["nat"])
        h.delete_rule = real
        lc.cleanup(CleanupReason.STOP)      # the retry finishes the job
        out(err=err, kept=sorted(kept), left=len(mine(vm)), fwd=fwd())
        """,
    )
    # three recorded rules and the same three found again by comment: every one reported
    assert res["err"].startswith("cleanup failed for 1 part(s): nat: NAT cleanup of VM web: 6 problem(s): cannot delete")
    assert res["err"].count("injected on POSTROUTING") == 2 and res["err"].count("injected on FORWARD") == 4
    assert "rules" in res["kept"] and res["left"] == 0 and res["fwd"] == "0"


@pytest.fixture
def trio():
    """host (bridge, uplink, the plugin's rules), guest (behind the bridge), internet (a
    TCP server that says who connected); every one made here and deleted after."""
    host, guest, net = Netns.make(), Netns.make(), Netns.make()
    try:
        host.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        host.run(["ip", "addr", "add", BRIDGE_ADDR, "dev", BRIDGE], check=True)
        host.run(["ip", "link", "set", BRIDGE, "up"], check=True)
        # the guest's NIC: a veth whose host end has the TAP's name, on the bridge
        host.run(["ip", "link", "add", "bt-web", "type", "veth", "peer", "name", "eth0", "netns", guest.name], check=True)
        host.run(["ip", "link", "set", "bt-web", "master", BRIDGE, "up"], check=True)
        guest.run(["ip", "addr", "add", "10.77.0.5/24", "dev", "eth0"], check=True)
        guest.run(["ip", "link", "set", "eth0", "up"], check=True)
        guest.run(["ip", "route", "add", "default", "via", "10.77.0.1"], check=True)
        host.veth_to(net, UPLINK, "up1", "198.51.100.1/24", "198.51.100.2/24")
        host.run(["ip", "route", "add", "default", "via", "198.51.100.2"], check=True)
        host.run(["iptables", "-A", "FORWARD", *ISOLATION], check=True)
        # connection attempts only: the NATed connection's last packets (its close) may
        # still pass, by conntrack, after its rules went
        net.run(["iptables", "-t", "raw", "-A", "PREROUTING", "-i", "up1", "-p", "tcp", "--dport", "9999", "--syn"], check=True)
        yield host, guest, net
    finally:
        for n in (host, guest, net):
            n.delete()


SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.51.100.2", 9999))
s.listen()
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(peer[0].encode())
    c.close()
"""


def test_a_real_packet_is_masqueraded_and_nothing_leaves_without_nat(trio):
    import subprocess
    import sys

    host, guest, net = trio
    server = subprocess.Popen(net.argv([sys.executable, "-c", SERVER]), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = (
            "import socket\n"
            "try:\n"
            "    print(socket.create_connection(('198.51.100.2', 9999), timeout=1.5).recv(64).decode())\n"
            "except OSError as exc:\n"
            "    print('unreachable', type(exc).__name__)\n"
        )
        res = inside(
            host,
            f"""
            import sys

            def connect():
                return subprocess.run(["ip", "netns", "exec", "{guest.name}", sys.executable, "-c", {client!r}],
                                      capture_output=True, text=True, timeout=30).stdout.strip()

            env = make()
            vm = vm_for(env, nat=True)
            seen = {{}}
            lc = start(env, vm, boot=lambda _m: seen.update(nat=connect()))
            lc.cleanup(CleanupReason.STOP)
            out(nat=seen["nat"], fwd=fwd())
            """,
        )
        counted = _packets(net)
        without = guest.python(client).stdout.strip()
        counted_after = _packets(net)
    finally:
        server.kill()
        server.wait()
    assert res["nat"] == "198.51.100.1"  # the server saw the uplink's address, not the guest's 10.77.0.5
    assert counted > 0
    assert without == "unreachable TimeoutError"
    assert counted_after == counted  # no packet of the guest's left the uplink once NAT was gone


def _packets(ns: Netns) -> int:
    text = ns.run(["iptables-save", "-c", "-t", "raw"], check=True).stdout
    m = re.search(r"^\[(\d+):\d+\] -A PREROUTING -i up1 -p tcp", text, re.M)
    assert m, text
    return int(m.group(1))
