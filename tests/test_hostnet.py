"""banger_core.hostnet, the one module of privileged network operations, exercised for
real inside a network namespace this test makes (never the host's own)."""

from __future__ import annotations

import json
import textwrap

import pytest

from netns import Netns


@pytest.fixture
def ns():
    n = Netns.make()
    try:
        yield n
    finally:
        n.delete()
    assert not n.exists()


def inside(ns: Netns, code: str) -> dict:
    r = ns.python("import json\nfrom banger_core import hostnet as h\n" + textwrap.dedent(code))
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bridge_taps_rename_delete_and_namespace_guard(ns):
    out = inside(
        ns,
        f"""
        created = h.ensure_bridge("bgbr0", "172.31.0.1/24", "02:42:ac:1f:00:01")
        again = h.ensure_bridge("bgbr0", "172.31.0.1/24", "02:42:ac:1f:00:01")
        h.create_tap("tap-pool-0", master="bgbr0")
        h.create_tap("tap-pool-1", master="bgbr0")
        h.rename_link("tap-pool-1", "bt-0123456789")
        br = h.link("bgbr0")
        tap = h.link("bt-0123456789")
        here = h.current_namespace()
        try:
            h.require_namespace("{ns.name}")
            ok = True
        except Exception as exc:
            ok = str(exc)
        try:
            h.require_namespace("no-such-ns")
            bad = None
        except Exception as exc:
            bad = str(exc)
        deleted = [h.delete_link("tap-pool-0"), h.delete_link("tap-pool-0")]
        try:
            h.create_tap("bad/name")
            refused = None
        except Exception as exc:
            refused = str(exc)
        print(json.dumps({{
            "created": [created, again], "br_mac": br.mac, "br_kind": br.kind, "tap_master": tap.master == br.index,
            "tap_kind": tap.kind, "tap_up": tap.up, "addrs": h.addresses("bgbr0"), "ns": here.name, "ok": ok, "bad": bad,
            "deleted": deleted, "refused": refused, "pool": [lk.name for lk in h.links("tap-pool-")],
        }}))
        """,
    )
    assert out["created"] == [True, False]  # idempotent
    assert out["br_mac"] == "02:42:ac:1f:00:01" and out["br_kind"] == "bridge"
    assert out["tap_master"] and out["tap_kind"] == "tun" and out["tap_up"]
    assert out["addrs"] == ["172.31.0.1/24"]
    assert out["ns"] == ns.name and out["ok"] is True
    assert "does not exist" in out["bad"]
    assert out["deleted"] == [True, False]
    assert "invalid interface name 'bad/name'" in out["refused"]
    assert out["pool"] == []
    assert {"bgbr0", "bt-0123456789"} <= ns.link_names()


def test_refuses_outside_the_expected_namespace(ns):
    other = Netns.make()
    try:
        out = inside(
            ns,
            f"""
            try:
                h.require_namespace("{other.name}")
                print(json.dumps({{"err": None}}))
            except Exception as exc:
                print(json.dumps({{"err": str(exc)}}))
            """,
        )
    finally:
        other.delete()
    assert out["err"].startswith(f"refusing to change the network: this daemon runs in '{ns.name}'")


def test_firewall_rules_and_sysctl(ns):
    out = inside(
        ns,
        """
        r = h.Rule("nat", "POSTROUTING", ("-s", "172.31.0.5/32", "-o", "up0", "-j", "MASQUERADE",
                                          "-m", "comment", "--comment", "banger:vm1"))
        first, second = h.insert_rule(r), h.insert_rule(r)
        listed = [x.spec for x in h.rules_matching("nat", "POSTROUTING", "banger:vm1")]
        gone = [h.delete_rule(r), h.delete_rule(r)]
        before = h.sysctl_get("net.ipv4.ip_forward")
        h.sysctl_set("net.ipv4.ip_forward", "1")
        after = h.sysctl_get("net.ipv4.ip_forward")
        try:
            h.Rule("filter", "FORWARD", ("-j", "ACCEPT; rm -rf /"))
            bad = None
        except Exception as exc:
            bad = str(exc)
        try:
            h.sysctl_set("kernel.core_pattern", "x")
            badsys = None
        except Exception as exc:
            badsys = str(exc)
        print(json.dumps({"ins": [first, second], "listed": listed, "gone": gone, "fw": [before, after], "bad": bad,
                          "badsys": badsys}))
        """,
    )
    assert out["ins"] == [True, False]
    assert len(out["listed"]) == 1 and "MASQUERADE" in out["listed"][0]
    assert out["gone"] == [1, 0]
    assert out["fw"] == ["0", "1"]  # a fresh namespace starts with forwarding off
    assert "is not allowed" in out["bad"] and "not a network sysctl" in out["badsys"]
    assert "banger:vm1" not in ns.iptables_save()


def test_calls_from_a_running_event_loop_are_served(ns):
    """pyroute2 runs a loop of its own: on the daemon's loop thread (RPC handlers, a
    service's status()) hostnet hands the call to its worker thread."""
    out = inside(
        ns,
        """
        import asyncio

        async def main():
            h.create_tap("tap-loop")
            return [lk.name for lk in h.links("tap-")], h.delete_link("tap-loop")

        print(json.dumps(asyncio.run(main())))
        """,
    )
    assert out == [["tap-loop"], True]
