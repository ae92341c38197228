"""The network plugin's pieces without guests: leases, modes, the namespace guard, the
host's resolver, the TAP pool (for real, inside a namespace the test makes), and the
guest side's netconf (banger.net= and the net op)."""

from __future__ import annotations

import ipaddress
import json
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from banger_core.errors import BangerError
from banger_core.store import Store
from banger_guest import netconf
from banger_network import _m1_leases, _m2_forwards
from banger_network.service import NetworkService, bridge_mac, host_resolver, tap_name
from banger_network.settings import Settings, VMOptions
from netns import Netns


def service(tmp_path: Path, **settings) -> NetworkService:
    store = Store(tmp_path / "banger.db")
    store.migrate_plugin("network", [(1, "leases", _m1_leases), (2, "forwards", _m2_forwards)])
    s = Settings(**settings)
    runtime = SimpleNamespace(config=SimpleNamespace(settings_for=lambda host, name: s), host=None)
    return NetworkService(SimpleNamespace(store=store, runtime=runtime))


def test_leases_are_distinct_kept_and_released(tmp_path):
    svc = service(tmp_path, subnet="10.9.0.0/29")
    a = svc.lease("a" * 16, "a")
    assert svc.lease("a" * 16, "a-renamed") == a  # kept across boots (and renames)
    got = [svc.lease(str(i) * 16, f"v{i}") for i in range(1, 5)]
    addrs = [a[0], *(g[0] for g in got)]
    assert sorted(addrs, key=ipaddress.IPv4Address) == [f"10.9.0.{i}" for i in range(2, 7)]  # .1 is the bridge's
    assert len({a[1], *(g[1] for g in got)}) == 5  # MACs too
    with pytest.raises(BangerError, match=r"no free address left in 10.9.0.0/29 \(5 leased\)"):
        svc.lease("f" * 16, "full")
    assert svc.release("a" * 16) and not svc.release("a" * 16)
    assert svc.lease("f" * 16, "full")[0] == a[0]  # the released address is leased again


def test_parallel_leases_never_share_an_address(tmp_path):
    svc = service(tmp_path)
    out: list[tuple[str, str]] = []

    def take(i: int) -> None:
        out.append(svc.lease(f"{i:016x}", f"vm{i}"))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({a for a, _m in out}) == 24 and len({m for _a, m in out}) == 24


def test_mode_precedence_and_the_namespace_guard(tmp_path, monkeypatch):
    monkeypatch.setenv("BANGER_NETNS", "none")
    svc = service(tmp_path, mode="bridge")
    vm = SimpleNamespace(id="0" * 16, name="x")
    assert svc.resolved_mode(vm, Settings(mode="bridge"), VMOptions(network="none")) == "none"  # the flag wins
    assert svc.resolved_mode(vm, Settings(mode="none"), VMOptions()) == "none"  # then project/user settings
    assert svc.resolved_mode(vm, Settings(mode="auto"), None) == "none"  # auto: may not act here
    assert "BANGER_NETNS = 'none'" in svc.auto_explained()
    with pytest.raises(BangerError, match="told to change no network namespace"):
        svc.guard()
    monkeypatch.setenv("BANGER_NETNS", "bgt-does-not-exist")
    with pytest.raises(BangerError, match="'bgt-does-not-exist' .* does not exist"):
        svc.guard()
    # no expectation: the first namespace is recorded, another is refused
    monkeypatch.delenv("BANGER_NETNS")
    with svc.store.transaction() as db:
        db["network_meta"].insert({"key": "netns", "value": "1:2"})
        db["network_meta"].insert({"key": "netns_name", "value": "'elsewhere' (net:[2])"})
    with pytest.raises(BangerError, match=r"bridge was made in namespace 'elsewhere' \(net:\[2\]\)"):
        svc.guard()


def test_settings_refuse_bad_values():
    for bad in ({"subnet": "10.0.0.0/30"}, {"subnet": "fd00::/64"}, {"bridge": "a/b"}, {"netns": "../x"}, {"mode": "nat"}):
        with pytest.raises(ValueError):
            Settings(**bad)
    with pytest.raises(ValueError):
        VMOptions(network="wifi")


def test_host_resolver_skips_loopback_stubs(tmp_path):
    stub, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    stub.write_text("# systemd-resolved stub\nnameserver 127.0.0.53\noptions edns0\n")
    upstream.write_text("nameserver ::1\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert host_resolver((str(stub), str(upstream))) == "192.0.2.53"
    assert host_resolver((str(stub),)) is None


def test_names():
    assert tap_name("0123456789abcdef") == "bt-0123456789ab" and len(tap_name("f" * 32)) == 15
    mac = bridge_mac("banger0")
    assert mac == bridge_mac("banger0") and mac != bridge_mac("banger1") and mac.startswith("02:")


def test_guest_netconf_parses_strictly_and_applies_in_order(tmp_path):
    conf = netconf.from_cmdline("172.30.0.5/24,172.30.0.1,192.0.2.53,02:42:aa:bb:cc:dd")
    assert (str(conf.address), str(conf.gateway), str(conf.resolver), conf.mac) == (
        "172.30.0.5/24",
        "172.30.0.1",
        "192.0.2.53",
        "02:42:aa:bb:cc:dd",
    )
    assert netconf.from_cmdline("172.30.0.5/24,,,").gateway is None
    for field, req in (
        ("address", {"address": "172.30.0.5"}),
        ("address", {"address": "nope/24"}),
        ("gateway", {"address": "10.0.0.2/24", "gateway": "10.0.0.256"}),
        ("mac", {"address": "10.0.0.2/24", "mac": "02:42:AA:BB:CC:DD"}),
        ("hostname", {"address": "10.0.0.2/24", "hostname": "x"}),
    ):
        with pytest.raises(netconf.BadRequest) as info:
            netconf.parse(req)
        assert info.value.field == field
    calls: list[list[str]] = []
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    done = netconf.apply(conf, "eth0", change_mac=True, run=calls.append, root=str(tmp_path))
    assert done == ["mac", "address", "gateway", "resolver"]
    assert calls == [
        ["link", "set", "dev", "eth0", "down"],
        ["link", "set", "dev", "eth0", "address", "02:42:aa:bb:cc:dd"],
        ["addr", "flush", "dev", "eth0"],
        ["addr", "add", "172.30.0.5/24", "dev", "eth0"],
        ["link", "set", "dev", "eth0", "up"],
        ["route", "replace", "default", "via", "172.30.0.1", "dev", "eth0"],
    ]
    resolv = tmp_path / "etc" / "resolv.conf"
    assert not resolv.is_symlink() and "nameserver 192.0.2.53" in resolv.read_text()


POOL = """
import json
from pathlib import Path
from types import SimpleNamespace
from banger_core import hostnet
from banger_core.store import Store
from banger_network import _m1_leases, _m2_forwards
from banger_network.service import NetworkService
from banger_network.settings import Settings

store = Store(Path({db!r}))
store.migrate_plugin("network", [(1, "leases", _m1_leases)])
s = Settings(bridge="bgbr", subnet="10.77.0.0/24", tap_pool=3)
rt = SimpleNamespace(config=SimpleNamespace(settings_for=lambda host, name: s), host=None)
svc = NetworkService(SimpleNamespace(store=store, runtime=rt))
out = {{}}
# what a killed daemon left: two pool TAPs on the bridge, one elsewhere
svc.ensure_bridge()
hostnet.create_tap("tap-pool-0", master="bgbr")
hostnet.create_tap("tap-pool-1", master="bgbr")
hostnet.create_tap("tap-pool-7")
out["adopt"] = svc.pool.adopt("bgbr", 3)
out["filled"] = svc.pool.fill_once()
out["pool"] = svc.pool.names()
out["took"] = [svc.attach_tap("bt-aaaaaaaaaaaa"), svc.attach_tap("bt-bbbbbbbbbbbb")]
out["vm_tap_master"] = hostnet.link("bt-aaaaaaaaaaaa").master == hostnet.link("bgbr").index
out["after_take"] = svc.pool.names()
out["refilled"] = svc.pool.fill_once()
svc.pool.stop()
out["drained"] = svc.pool.drain()
out["left"] = [lk.name for lk in hostnet.links("tap-pool-")]
out["isolation"] = hostnet.rule_exists(hostnet.Rule("filter", "FORWARD", ("-i", "bgbr", "!", "-o", "bgbr", "-m", "comment",
                                                                         "--comment", "banger:bridge-isolation", "-j", "DROP")))
print(json.dumps(out))
"""


def test_tap_pool_adopts_fills_hands_out_and_drains(tmp_path):
    ns = Netns.make()
    try:
        r = ns.python(
            textwrap.dedent(POOL.format(db=str(tmp_path / "banger.db"))),
            env={"BANGER_NETNS": ns.name, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        out = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        ns.delete()
    assert out["adopt"] == [["tap-pool-0", "tap-pool-1"], ["tap-pool-7"]]
    assert out["filled"] == 1 and out["pool"] == ["tap-pool-0", "tap-pool-1", "tap-pool-2"]
    assert out["took"] == ["pool", "pool"] and out["vm_tap_master"]
    assert len(out["after_take"]) == 1 and out["refilled"] == 2
    assert len(out["drained"]) == 3 and all(n.startswith("tap-pool-") for n in out["drained"])
    assert out["left"] == [] and out["isolation"]


def test_auto_picks_user_mode_only_where_the_vmm_has_it(tmp_path, monkeypatch):
    from banger_core import hostnet

    monkeypatch.delenv("BANGER_NETNS", raising=False)
    monkeypatch.setattr(hostnet, "may_create_taps", lambda: (False, "no CAP_NET_ADMIN"))
    svc = service(tmp_path)
    qemu, fc = SimpleNamespace(id="1" * 16, name="q", driver="qemu"), SimpleNamespace(id="2" * 16, name="f", driver="firecracker")
    assert svc.resolved_mode(qemu, Settings(), None) == "user"
    assert svc.resolved_mode(fc, Settings(), None) == "none"  # Firecracker has no user-mode networking
    assert svc.resolved_mode(fc, Settings(), VMOptions(network="user")) == "user"  # asked: prepare_host refuses it
    assert svc.user_refusal("firecracker") == "the firecracker VMM has no user-mode networking (QEMU has)"
    assert svc.auto_explained("qemu").startswith("user (no CAP_NET_ADMIN)")
    monkeypatch.setenv("BANGER_NETNS", "none")  # told to use no network at all: not even user mode
    assert svc.resolved_mode(qemu, Settings(), None) == "none"
    assert "told to change no network namespace" in (svc.user_refusal("qemu") or "")


def test_forwards_follow_the_pushed_listener_lists(tmp_path):
    """The forwarding policy against a fake VMM: the same host port when free, else an
    ephemeral one; a pin or nothing; exclusions, loopback-only listeners; removal; and
    the table the next daemon adopts from."""
    from banger_core.errors import ErrorCode
    from banger_core.models import HostForward
    from banger_network.forwards import ForwardManager
    from banger_network.settings import ForwardSettings

    taken = {("tcp", 8080), ("tcp", 19090)}  # host ports something else holds
    held: dict[tuple[str, int], int] = {}  # (proto, host port) -> guest port

    def host_forward(vm, nic, fwd: HostForward, remove=False):
        key = (fwd.proto, fwd.host_port)
        if remove:
            return held.pop(key, None) is not None
        if key in taken or key in held:
            raise BangerError(ErrorCode.BUSY, f"{fwd.spec()} taken")
        held[key] = fwd.guest_port
        return True

    store = Store(tmp_path / "banger.db")
    store.migrate_plugin("network", [(1, "leases", _m1_leases), (2, "forwards", _m2_forwards)])
    vms = SimpleNamespace(host_forward=host_forward)
    store.get_vm = lambda vm_id: SimpleNamespace(id=vm_id)
    rules = ForwardSettings(exclude=["6060", "udp/5353"], pin={"9090": 19090, "9191": 19191})
    mgr = ForwardManager(SimpleNamespace(store=store, vms=vms), lambda: SimpleNamespace(forward=rules))
    from banger_network.forwards import Forwarder

    relays: dict[int, int] = {}  # host port -> guest port, of the agent relays open

    class Relay:
        def __init__(self, guest: int, host: int) -> None:
            if host in relays or ("tcp", host) in taken or ("tcp", host) in held:
                raise OSError(98, "Address already in use")
            self.port = host or 40000 + guest
            relays[self.port] = guest

        def close(self) -> None:
            relays.pop(self.port, None)

    f = Forwarder(mgr, "v" * 16, "web", "10.0.2.15", {}, proxy=Relay)

    def push(*listeners):
        f.on_listeners([{"proto": p, "address": a, "port": n} for p, a, n in listeners])
        f.apply(rules)
        return {d["guest"]: d.get("host") or d["why"] for d in f.describe()}

    got = push(("tcp", "0.0.0.0", 3000), ("tcp", "::", 8080), ("udp", "0.0.0.0", 67), ("tcp", "127.0.0.1", 7070),
               ("tcp", "0.0.0.0", 6060), ("udp", "::", 5353), ("tcp", "10.0.2.15", 9090), ("tcp", "0.0.0.0", 9191),
               ("tcp", "192.168.1.5", 4000), ("udp", "127.0.0.1", 5000), ("tcp", "127.0.0.1", 8080))  # fmt: skip
    assert got["tcp/3000"] == "127.0.0.1:3000" and got["udp/67"] == "127.0.0.1:67"
    assert got["tcp/8080"].startswith("127.0.0.1:") and got["tcp/8080"] != "127.0.0.1:8080"  # taken: an ephemeral one
    assert "pinned to 127.0.0.1:19090" in got["tcp/9090"] and got["tcp/9191"] == "127.0.0.1:19191"
    assert "exclude" in got["tcp/6060"] and "exclude" in got["udp/5353"]
    assert got["tcp/7070"] == "127.0.0.1:7070" and relays == {7070: 7070}  # loopback TCP: relayed by the agent
    assert [d.get("via") for d in f.describe() if d["guest"] == "tcp/7070"] == ["agent"]
    assert "only the guest reaches it" in got["udp/5000"] and "not to the guest's 10.0.2.15" in got["tcp/4000"]
    assert f.endpoint(("tcp", 8080), {"proto": "tcp", "address": "::", "port": 8080}) == got["tcp/8080"]  # the wildcard one wins
    assert f.endpoint(("tcp", 7070), {"proto": "tcp", "address": "127.0.0.1", "port": 7070}) == "127.0.0.1:7070"
    rows = {(r["proto"], r["guest_port"]): r["host_port"] for r in mgr.rows("v" * 16)}
    assert rows == {(p, g): h for (p, h), g in held.items()} and len(rows) == 4
    # 3000 goes, 5000 comes; the others stay as they were (no re-add)
    before = dict(held)
    got = push(("tcp", "::", 8080), ("udp", "0.0.0.0", 67), ("tcp", "0.0.0.0", 9191), ("tcp", "0.0.0.0", 5000))
    assert "tcp/3000" not in got and ("tcp", 3000) not in held and got["tcp/5000"] == "127.0.0.1:5000"
    assert relays == {}  # the loopback listener went: its relay closed
    assert {k: v for k, v in held.items() if v != 5000} == {k: v for k, v in before.items() if v != 3000}
    # the table (what the next daemon adopts) follows
    assert {(r["proto"], r["guest_port"]) for r in mgr.rows("v" * 16)} == {
        ("tcp", 8080),
        ("udp", 67),
        ("tcp", 9191),
        ("tcp", 5000),
    }
    f.close()
    assert mgr.rows("v" * 16) == [] and f.forwards == {}
    rules.auto = False  # forwarding switched off: a new list forwards nothing
    f2 = Forwarder(mgr, "w" * 16, "w", "10.0.2.15", {})
    f2.on_listeners([{"proto": "tcp", "address": "0.0.0.0", "port": 3000}])
    f2.apply(rules)
    assert f2.forwards == {} and mgr.rows("w" * 16) == []
