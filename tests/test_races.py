"""Races the original tool hit, against real guests (busybox image, TCG) and a real
daemon: pull waiters that go away, parallel creates that need the same missing
artifacts, a slow pull beside an unrelated create, `kernel rm` and `image register`
beside a pull of the same name, prune beside a running VM, daemon stop with VMs
running, and restart holding the VM's lock.

Downloads come from a local HTTP server whose bundle responses can be held at a gate,
so "a pull in progress" is a state the test controls, not a timing guess. Five boots:
the shared VM, two parallel creates, one create beside a held pull, and the restart
(a sixth when the prune test runs alone and makes its own stopped VM).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import guest_assets as ga
from conftest import BANGER, isolated_env, pid_alive, wait_for

BOOT_TIMEOUT = 240
SPEC = ["--vcpu", "1", "--memory", "256M"]

pytestmark = pytest.mark.slow


class GatedServer:
    """Serves a directory; GETs are counted per path, and a path can be held at a gate
    (the response waits until the gate opens) to keep a pull in progress."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gets: dict[str, int] = {}
        self.gates: dict[str, threading.Event] = {}
        self.arrived: dict[str, threading.Event] = {}
        outer = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.gets[self.path] = outer.gets.get(self.path, 0) + 1
                outer.arrived.setdefault(self.path, threading.Event()).set()
                gate = outer.gates.get(self.path)
                if gate is not None:
                    gate.wait(timeout=600)
                super().do_GET()

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def gate(self, path: str) -> threading.Event:
        self.gates[path] = threading.Event()
        self.arrived[path] = threading.Event()
        return self.gates[path]

    def close(self) -> None:
        for g in self.gates.values():
            g.set()
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture(scope="module")
def assets():
    return ga.busybox_assets()


@pytest.fixture(scope="module")
def world(assets, example_plugin_dir, tmp_path_factory):
    """One daemon env with the example plugin recording hooks, the busybox image, a
    catalog of bundles served by a gated server, and one running VM ``keep``."""
    tmp = tmp_path_factory.mktemp("races")
    www = tmp / "www"
    www.mkdir()
    server = GatedServer(www)
    record = tmp / "hooks.jsonl"
    with isolated_env() as env:
        env.extra_path.append(str(example_plugin_dir))
        base = f"[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n[example]\nrecord = '{record}'\n"
        env.write_config(base)
        env.run("kernel", "import", "src-kernel", "--from", str(assets["kernel_dir"]), check=True)
        env.run("image", "register", "busybox", "--rootfs", str(assets["rootfs"]), "--kernel-ref", "src-kernel", check=True)
        ker = json.loads(env.run("kernel", "bundle", "src-kernel", "-o", str(www / "k.tar.zst"), "--json", check=True).stdout)
        img = json.loads(env.run("image", "bundle", "busybox", "-o", str(www / "img.tar.zst"), "--json", check=True).stdout)

        def kb(path: str) -> dict:
            return {"bundle": {"url": f"{server.url}/{path}", "sha256": ker["sha256"], "size": ker["size"]}}

        def ib(path: str, kernel_ref: str) -> dict:
            return {
                "kernel_ref": kernel_ref,
                "bundle": {"url": f"{server.url}/{path}", "sha256": img["sha256"], "size": img["size"]},
            }

        # the same files under several names: each catalog entry has its own URL path
        for alias in ("k-par.tar.zst", "k-held.tar.zst", "k-rm.tar.zst"):
            os.link(www / "k.tar.zst", www / alias)
        for alias in ("img-par.tar.zst", "img-held.tar.zst", "img-reg.tar.zst"):
            os.link(www / "img.tar.zst", www / alias)
        cat = tmp / "catalog.json"
        cat.write_text(
            json.dumps(
                {
                    "version": 1,
                    "kernels": {"k-par": kb("k-par.tar.zst"), "k-held": kb("k-held.tar.zst"), "k-rm": kb("k-rm.tar.zst")},
                    "images": {
                        "img-par": ib("img-par.tar.zst", "k-par"),
                        "img-held": ib("img-held.tar.zst", "src-kernel"),
                        "img-reg": ib("img-reg.tar.zst", "src-kernel"),
                    },
                }
            )
        )
        env.write_config(base + f"[catalog]\npath = '{cat}'\n")
        env.run("vm", "create", "--name", "keep", "--image", "busybox", *SPEC, timeout=BOOT_TIMEOUT, check=True)
        wait_boot(env, "keep")
        yield {"env": env, "server": server, "record": record}
        server.close()
        names = [v["name"] for v in vms(env)]
        if names:
            env.run("vm", "delete", "--force", *names, timeout=180)


def vms(env) -> list[dict]:
    r = env.run("vm", "list", "--json")
    return json.loads(r.stdout) if r.returncode == 0 else []


def show(env, name: str) -> dict:
    return json.loads(env.run("vm", "show", name, "--json", check=True).stdout)


def boots(env, name: str) -> int:
    return env.run("vm", "logs", name, "-n", "0", check=True).stdout.count(ga.BOOT_MARKER)


def wait_boot(env, name: str, count: int = 1) -> None:
    wait_for(lambda: boots(env, name) >= count, timeout=BOOT_TIMEOUT, interval=0.5)


def hooks(record: Path, vm: str) -> list[str]:
    if not record.exists():
        return []
    return [e["hook"] for e in map(json.loads, record.read_text().splitlines()) if e.get("vm") == vm]


def log_lines(env) -> list[dict]:
    return [json.loads(ln) for ln in (env.state_dir / "bangerd.log").read_text().splitlines()]


def popen(env, *args: str) -> subprocess.Popen:
    return subprocess.Popen([BANGER, *args], env=env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_pull_waiter_that_disconnects_returns_promptly_and_the_pull_goes_on(world):
    env, server = world["env"], world["server"]
    gate = server.gate("/k-held.tar.zst")
    first = popen(env, "kernel", "pull", "k-held")
    assert server.arrived["/k-held.tar.zst"].wait(60), "the first pull never reached the server"
    before = len(log_lines(env))
    waiter = popen(env, "kernel", "pull", "k-held")
    op = wait_for(
        lambda: next((ln["op_id"] for ln in log_lines(env)[before:] if ln["msg"] == "request kernel.pull"), None), timeout=30
    )
    time.sleep(0.5)  # it is now waiting for the first pull's lock
    waiter.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    waiter.communicate(timeout=30)

    def cancelled() -> bool:
        return any(ln["op_id"] == op and "cancelled" in ln["msg"] for ln in log_lines(env))

    wait_for(cancelled, timeout=10)
    assert time.monotonic() - t0 < 5, "the waiter's request outlived its client"
    assert first.poll() is None, "the first pull must go on"
    gate.set()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert server.gets["/k-held.tar.zst"] == 1
    assert "k-held" in {k["name"] for k in json.loads(env.run("kernel", "list", "--json", check=True).stdout)}


def test_parallel_creates_needing_one_missing_image_fetch_once_and_all_succeed(world):
    env, server = world["env"], world["server"]
    procs = [popen(env, "vm", "create", "--name", f"par-{i}", "--image", "img-par", *SPEC) for i in (1, 2)]
    outs = [p.communicate(timeout=BOOT_TIMEOUT * 2) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert server.gets.get("/k-par.tar.zst") == 1 and server.gets.get("/img-par.tar.zst") == 1, server.gets
    for name in ("par-1", "par-2"):
        wait_boot(env, name)
        assert show(env, name)["state"] == "running"
    # leave them stopped: the prune test deletes stopped VMs. A VM named twice, or by
    # its name and an ID prefix, is stopped once: one result per distinct ref.
    prefix = show(env, "par-2")["id"][:8]
    r = env.run("vm", "stop", "par-1", "par-2", "par-1", prefix, "--json", timeout=180, check=True)
    res = json.loads(r.stdout)
    assert [x["ref"] for x in res] == ["par-1", "par-2", prefix] and all(x["ok"] for x in res), res
    for name in ("par-1", "par-2"):
        assert hooks(world["record"], name).count("cleanup") == 1  # once per stop
    # vm set takes several refs like every other verb
    r = env.run("vm", "set", "par-1", "par-2", "--vcpu", "2", check=True)
    assert "par-1: vcpu=2" in r.stdout and "par-2: vcpu=2" in r.stdout
    assert show(env, "par-1")["spec"]["vcpus"] == show(env, "par-2")["spec"]["vcpus"] == 2


def test_a_held_pull_of_one_image_does_not_block_creating_from_another(world):
    env, server = world["env"], world["server"]
    gate = server.gate("/img-held.tar.zst")
    held = popen(env, "image", "pull", "img-held")
    try:
        assert server.arrived["/img-held.tar.zst"].wait(60)
        r = env.run("vm", "create", "--name", "beside", "--image", "busybox", *SPEC, timeout=BOOT_TIMEOUT, check=True)
        assert "beside" in r.stdout
        assert held.poll() is None, "the held pull finished early: the test proved nothing"
    finally:
        gate.set()
    _, err = held.communicate(timeout=300)
    assert held.returncode == 0, err
    env.run("vm", "delete", "beside", "--force", timeout=180, check=True)


def waits_for_held_pull(world, bundle: str, pull_args: list[str], other_args: list[str]) -> subprocess.Popen:
    """Start a pull whose download is held at the gate, then ``other_args``; check the
    other command waits while the pull is held; open the gate; the pull must succeed.
    Returns the other command's process (finishing or finished)."""
    env, server = world["env"], world["server"]
    gate = server.gate(f"/{bundle}")
    pull = popen(env, *pull_args)
    try:
        assert server.arrived[f"/{bundle}"].wait(60)
        other = popen(env, *other_args)
        time.sleep(1.5)
        assert other.poll() is None, f"{' '.join(other_args[:2])} did not wait for the pull"
    finally:
        gate.set()
    assert pull.wait(300) == 0, pull.communicate()
    return other


def test_kernel_rm_waits_for_a_pull_of_the_same_name(world):
    """The original tool removed a kernel a pull was still writing; here `kernel rm`
    takes the pull's per-name lock: it waits, then removes what the pull made."""
    env = world["env"]
    rm = waits_for_held_pull(world, "k-rm.tar.zst", ["kernel", "pull", "k-rm"], ["kernel", "rm", "k-rm"])
    out, err = rm.communicate(timeout=60)
    assert rm.returncode == 0, err
    assert "k-rm" not in {k["name"] for k in json.loads(env.run("kernel", "list", "--json", check=True).stdout)}
    assert not (env.state_dir / "kernels" / "k-rm").exists()


def test_image_register_waits_for_a_pull_of_the_same_name(world, assets):
    """`image register` checks and writes under the pull's per-name lock: it cannot slip
    a row in while a pull of that name is writing (the pull's row would overwrite it)."""
    env = world["env"]
    register = ["image", "register", "img-reg", "--rootfs", str(assets["rootfs"]), "--kernel-ref", "src-kernel"]
    reg = waits_for_held_pull(world, "img-reg.tar.zst", ["image", "pull", "img-reg"], register)
    _, err = reg.communicate(timeout=60)
    assert reg.returncode == 1 and "image 'img-reg' already exists" in err, err
    img = json.loads(env.run("image", "show", "img-reg", "--json", check=True).stdout)
    assert img["managed"] and img["source"].startswith("img-reg#bundle:")
    env.run("image", "delete", "img-reg", check=True)


def test_prune_deletes_every_stopped_vm_and_never_a_running_one(world):
    env, record = world["env"], world["record"]
    if not [v for v in vms(env) if v["state"] != "running"]:
        env.run("vm", "create", "--name", "stopme", "--image", "busybox", *SPEC, timeout=BOOT_TIMEOUT, check=True)
        env.run("vm", "stop", "stopme", timeout=180, check=True)
    stopped = {v["name"] for v in vms(env) if v["state"] != "running"}
    running = {v["name"]: v["pid"] for v in vms(env) if v["state"] == "running"}
    assert "keep" in running and stopped
    before = {n: hooks(record, n).count("cleanup") for n in stopped}
    r = env.run("vm", "prune", "-f", "--json", timeout=180, check=True)
    assert {d["name"] for d in json.loads(r.stdout)["deleted"]} == stopped
    left = {v["name"]: v for v in vms(env)}
    assert set(left) == set(running)
    for name, pid in running.items():
        assert left[name]["state"] == "running" and left[name]["pid"] == pid and pid_alive(pid)
    for name in stopped:  # a delete runs every plugin's cleanup exactly once
        assert hooks(record, name).count("cleanup") == before[name] + 1, hooks(record, name)


def test_daemon_stop_leaves_vms_running_and_the_next_daemon_adopts_them(world):
    env = world["env"]
    vm = show(env, "keep")
    assert vm["state"] == "running"
    daemon = env.daemon_pid()
    env.run("daemon", "stop", check=True)
    assert daemon is not None and not pid_alive(daemon)
    assert pid_alive(vm["pid"])
    again = show(env, "keep")  # starts a new daemon, which adopts the VM
    assert env.daemon_pid() != daemon
    assert again["state"] == "running" and again["pid"] == vm["pid"]
    assert boots(env, "keep") == 1  # the same boot: never restarted


def test_restart_holds_the_vm_lock_across_stop_and_start(world):
    env, record = world["env"], world["record"]
    first = show(env, "keep")
    vcpus = first["spec"]["vcpus"]
    seen = len(hooks(record, "keep"))
    restart = popen(env, "vm", "restart", "keep")
    # the stop is under way (the plugin was asked to shut the guest down)
    wait_for(lambda: "request_guest_shutdown" in hooks(record, "keep")[seen:], timeout=60)
    before = len(log_lines(env))
    # sent from here, at once (a CLI's start-up can outlast a restart of this small guest)
    from banger_core.client import Client
    from banger_core.paths import Paths

    res = Client(Paths.from_env(env.env())).call("vm.set", {"refs": ["keep"], "vcpus": vcpus + 1}, autostart=False)
    out, err = restart.communicate(timeout=BOOT_TIMEOUT)
    assert restart.returncode == 0, err
    # `vm set` waited for the whole restart, then found the VM running again
    (one,) = res["results"]
    assert not one["ok"] and "is running: stop it before changing its spec" in one["error"]["message"], one
    lines = log_lines(env)[before:]
    msgs = [ln["msg"] for ln in lines]
    asked = msgs.index("request vm.set")
    stopped = next(i for i, m in enumerate(msgs) if m.startswith("VM keep: shut down"))
    booted = next(i for i, m in enumerate(msgs) if "qemu-system" in m and i > stopped)  # the restart's new VMM
    refused = next(i for i, m in enumerate(msgs) if m.startswith("request vm.set ok"))  # its reply
    # asked before the restart had booted the VM again, answered only after it had (the
    # restart's own reply may be logged a moment later: its lock is released first)
    assert asked < booted < refused, msgs
    calls = hooks(record, "keep")[seen:]
    assert calls.index("cleanup") < calls.index("prepare_host") and calls.count("cleanup") == 1, calls
    vm = show(env, "keep")
    assert vm["state"] == "running" and vm["spec"]["vcpus"] == vcpus
    assert vm["pid"] != first["pid"] and not pid_alive(first["pid"])
    wait_boot(env, "keep")  # a fresh console: the new boot's
