"""The core pieces plugins build on, through the daemon and CLI with the pip-installed
example plugin and the fake `firecracker` (VMs created, stopped and started for real;
no guest boots):

- per-VM plugin options: flags on `vm create`/`vm set`, stored with the VM, handed to
  the hooks (the example puts its motto on the kernel command line), shown, changed
  on a stopped VM, surviving stop/start;
- plugins' fields in `vm show` and as `vm list` columns;
- one plugin using another's daemon-side service by capability.
"""

from __future__ import annotations

import json
import sqlite3

from conftest import fc_create, make_dist

# Uses the example's "greeter" service by capability (never importing banger_example's
# implementation; its api module is for typing only), and shows a field that fails.
CONSUMER = """
import os
from typing import TYPE_CHECKING

from banger_core import hookimpl

if TYPE_CHECKING:
    from banger_example.api import Greeter

requires = ["greeter"]


@hookimpl
def prepare_host(ctx):
    greeter: "Greeter" = ctx.service("greeter")
    with open(os.environ["CONSUMER_LOG"], "a") as fh:
        fh.write(greeter.greet(ctx.vm.name) + "\\n")


@hookimpl
def vm_fields(ctx, detail):
    raise RuntimeError("no fields today")
"""

# Asks for a service it did not declare in `requires`.
SNEAKY = """
from banger_core import hookimpl

opt_in = True


@hookimpl
def prepare_host(ctx):
    ctx.service("greeter")
"""


def show(env, name: str) -> dict:
    return json.loads(env.run("vm", "show", name, "--json", check=True).stdout)


def rows(env) -> list:
    return sqlite3.connect(env.state_dir / "banger.db").execute("select name from vms").fetchall()


def test_per_vm_plugin_options(fcenv):
    env = fcenv
    try:
        help_text = env.run("vm", "create", "--help", check=True).stdout
        assert "--motto" in help_text and "--loud" in help_text and "--no-loud" in help_text and "--repeat" in help_text
        assert "--motto" in env.run("vm", "set", "--help", check=True).stdout
        assert "--motto" in env.run("vm", "run", "--help", check=True).stdout  # vm run takes them too

        fc_create(env, "opt", None, "--motto", "hi", "--loud", "--repeat", "2")
        vm = show(env, "opt")
        assert vm["options"] == {"example": {"motto": "hi", "loud": True, "repeat": 2}}
        assert "example.motto=HI-HI" in vm["machine"]["boot_args"]  # the hooks got them
        assert vm["fields"]["example"]["motto"] == "HI-HI" and vm["fields"]["example"]["prepared"] is True
        assert vm["fields"]["example"]["greeted"] == 0  # vm_fields reached the plugin's service (ctx.service)
        human = env.run("vm", "show", "opt", check=True).stdout
        assert 'options:  example: motto="hi" loud=true repeat=2' in human and "example.motto: HI-HI" in human

        listed = json.loads(env.run("vm", "list", "--json", check=True).stdout)
        assert listed[0]["fields"]["example"] == {"motto": "HI-HI"}  # the short form
        table = env.run("vm", "list", check=True).stdout.splitlines()
        assert table[0].split()[-1] == "MOTTO" and table[1].split()[-1] == "HI-HI"

        # changed on a stopped VM only; merged over what was given; survives stop/start
        r = env.run("vm", "set", "opt", "--no-loud")
        assert r.returncode == 1 and "stop it before changing" in r.stderr
        env.run("vm", "stop", "opt", check=True)
        env.run("vm", "set", "opt", "--no-loud", check=True)
        assert show(env, "opt")["options"] == {"example": {"motto": "hi", "loud": False, "repeat": 2}}
        env.run("vm", "start", "opt", check=True)
        vm = show(env, "opt")
        assert "example.motto=hi-hi" in vm["machine"]["boot_args"] and vm["state"] == "running"

        # bad values: a clear error, nothing changed or created
        env.run("vm", "stop", "opt", check=True)
        r = env.run("vm", "set", "opt", "--repeat", "9")
        assert r.returncode == 1 and "options for example: repeat: Input should be less than or equal to 3" in r.stderr
        r = fc_create(env, "bad", None, "--repeat", "0", check=False)
        assert r.returncode == 1 and "options for example: repeat" in r.stderr
        assert rows(env) == [("opt",)] and show(env, "opt")["options"]["example"]["repeat"] == 2

        # options for a plugin that does not act on the project's VMs are refused
        proj = env.root / "proj"
        proj.mkdir()
        (proj / "banger.toml").write_text("[plugins]\ndisable = ['example']\n")
        r = fc_create(env, "elsewhere", proj, "--motto", "x", check=False)
        assert r.returncode == 1 and "options for 'example': that plugin does not act on VMs made from" in r.stderr
        assert rows(env) == [("opt",)]

        # the CLI index knows who adds flags to vm create
        index = json.loads((env.root / "cache" / "cli-index.json").read_text())
        # (nat and network add --nat and --network; workspace --mode, --include-untracked, --bootstrap)
        assert index["commands"]["vm create"] == ["example", "nat", "network", "workdisk", "workspace"]
        assert index["commands"]["vm create"] == index["commands"]["vm set"]
    finally:
        env.run("vm", "delete", "--force", "opt", timeout=60)
        env.stop_daemon()


def test_a_plugin_uses_anothers_service_by_capability(fcenv, tmp_path):
    env = fcenv
    make_dist(tmp_path / "consumer", "banger-consumer", "consumer", CONSUMER)
    make_dist(tmp_path / "sneaky", "banger-sneaky", "sneaky", SNEAKY)
    env.extra_path += [str(tmp_path / "consumer"), str(tmp_path / "sneaky")]
    env.extra_env["CONSUMER_LOG"] = str(tmp_path / "consumer.log")
    env.write_config(env.config_file.read_text() + "[example]\ngreeting = 'Howdy'\ntimes = 2\n")
    try:
        order = json.loads(env.run("plugins", "resolve", "--json", check=True).stdout)["order"]
        assert order.index("example") < order.index("consumer")  # the provider first
        fc_create(env, "served")
        assert (tmp_path / "consumer.log").read_text() == "Howdy, served! Howdy, served!\n"
        # the same service object, reached from an RPC handler through call.state
        greeted = env.python("from banger_core.client import Client; print(Client().call('example.greeted')['greeted'])").stdout
        assert greeted.strip() == "1"

        # a plugin's failing vm_fields shows as its error field; nothing else breaks
        vm = show(env, "served")
        assert vm["fields"]["consumer"] == {"error": "RuntimeError: no fields today"}
        assert vm["fields"]["example"]["greeting"] == "Howdy"

        # using a service without requiring its capability is refused, by name
        proj = tmp_path / "proj"
        proj.mkdir()
        (proj / "banger.toml").write_text("[plugins]\nenable = ['sneaky']\n")
        r = fc_create(env, "sneaky-vm", proj, check=False)
        assert r.returncode == 1
        assert "plugin 'sneaky' uses the 'greeter' service without declaring requires = ['greeter']" in r.stderr
        assert rows(env) == [("served",)]
    finally:
        env.run("vm", "delete", "--force", "served", timeout=60)
        env.stop_daemon()


def test_logs_follow_streams_until_the_vm_stops(fcenv):
    """`vm logs -f` is a streaming method: the tail, then new output as the console log
    grows (binary-safe), and it ends by itself when the VM stops."""
    import subprocess
    import time

    from conftest import BANGER

    env = fcenv
    try:
        fc_create(env, "chatty")
        console = show(env, "chatty")["console_log"]
        with open(console, "ab") as fh:
            fh.write(b"before follow\n")
        proc = subprocess.Popen(
            [BANGER, "vm", "logs", "chatty", "-f", "-n", "1"], env=env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"before follow\n"
        with open(console, "ab") as fh:
            fh.write(b"live \xff\xfe line\n")  # not UTF-8: passed through as is
        assert proc.stdout.readline() == b"live \xff\xfe line\n"
        time.sleep(0.5)
        assert proc.poll() is None  # still following while the VM runs
        env.run("vm", "stop", "chatty", check=True)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        env.run("vm", "delete", "--force", "chatty", timeout=60)
        env.stop_daemon()


FLAKY = """
from banger_core import hookimpl


@hookimpl
def register_rpc_methods(register):
    async def ping(params, call):
        return {"pong": True}

    register("flaky.ping", ping)


@hookimpl
def register_services(register, daemon):
    raise RuntimeError("service start failed")
"""


def test_a_plugin_whose_services_fail_is_broken_in_the_daemon_methods_and_all(benv, tmp_path):
    make_dist(tmp_path / "flaky", "banger-flaky", "flaky", FLAKY)
    benv.extra_path.append(str(tmp_path / "flaky"))
    try:
        benv.run("daemon", "start", check=True)
        status = json.loads(benv.run("daemon", "status", "--json", check=True).stdout)
        assert status["broken"]["flaky"] == "register_services failed: RuntimeError: service start failed"
        assert "flaky.ping" not in status["methods"] and "flaky" not in status["plugins"]
    finally:
        benv.stop_daemon()


def test_a_plugins_image_source_through_image_pull(benv, example_plugin_dir, tmp_path):
    """The example's toy source: `image pull toy:NAME` goes through the core's pull path
    (lock, rootfs checks, publish, store), its revision drives staleness, and a failing
    source leaves nothing."""
    import subprocess

    benv.extra_path.append(str(example_plugin_dir))
    revision = tmp_path / "toy-revision"
    benv.extra_env["BANGER_EXAMPLE_TOY_REVISION_FILE"] = str(revision)
    try:
        r = benv.run("image", "pull", "toy:hello", check=True)
        img = json.loads(benv.run("image", "show", "toy-hello", "--json", check=True).stdout)
        assert img["managed"] and img["source"] == "toy:hello#1" and img["stale"] is None
        rootfs = img["rootfs"]
        assert rootfs == str(benv.state_dir / "images" / "toy-hello" / "rootfs.ext4")
        cat = subprocess.run(["debugfs", "-R", "cat /etc/toy", rootfs], capture_output=True, text=True).stdout
        assert cat.strip() == "hello revision 1"
        # the example's guest payload went into the image (register_guest_payload)
        motd = subprocess.run(["debugfs", "-R", "cat /etc/banger-example/motd", rootfs], capture_output=True, text=True)
        assert motd.stdout == "built with the example plugin\n"
        stat = subprocess.run(["debugfs", "-R", "stat /etc/banger-example/motd", rootfs], capture_output=True, text=True)
        assert "Mode:  0640" in stat.stdout, stat.stdout
        link = subprocess.run(["debugfs", "-R", "stat /etc/banger-example/link", rootfs], capture_output=True, text=True)
        assert 'Fast link dest: "motd"' in link.stdout, link.stdout
        offered = json.loads(benv.run("image", "list", "--available", "--json", check=True).stdout)
        toy = next(o for o in offered if o["name"] == "toy:demo")
        assert toy["source"] == "toy" and toy["plugin"] == "example" and not toy["pulled"]
        # options the source does not take are refused before it is asked anything
        r2 = benv.run("image", "pull", "toy:other", "--size", "64M")
        assert r2.returncode == 1
        assert "--size do(es) not apply to 'toy:other' (source toy, plugin example, which takes none)" in r2.stderr
        # pulled and current: a second pull keeps it; a new revision makes it stale, and a pull rebuilds
        assert benv.run("image", "pull", "toy:hello", check=True).stdout == r.stdout
        revision.write_text("2\n")
        img = json.loads(benv.run("image", "show", "toy-hello", "--json", check=True).stdout)
        assert img["stale"] == "made by toy at 1, it now makes 2; `banger image pull toy:hello` refreshes it"
        benv.run("image", "pull", "toy:hello", check=True)
        cat = subprocess.run(["debugfs", "-R", "cat /etc/toy", rootfs], capture_output=True, text=True).stdout
        assert cat.strip() == "hello revision 2"

        # a failing source: a clear error naming it, and nothing left
        r = benv.run("image", "pull", "toy:fail")
        assert r.returncode == 1
        assert "source toy (plugin example) failed on 'toy:fail': RuntimeError: the toy source cannot make 'fail'" in r.stderr
        assert sorted(p.name for p in (benv.state_dir / "images").iterdir()) == ["toy-hello"]
        assert "toy-fail" not in benv.run("image", "list", check=True).stdout
    finally:
        benv.stop_daemon()


def test_doctor_says_where_the_default_image_comes_from(benv, example_plugin_dir):
    benv.extra_path.append(str(example_plugin_dir))

    def default_image() -> dict:
        checks = json.loads(benv.run("doctor", "--json").stdout)["checks"]
        return next(c for c in checks if c["name"] == "default image")

    assert default_image() == {
        "name": "default image",
        "status": "PASS",
        "detail": "debian-bookworm: the source debian (debian) provides it on first use",
    }
    benv.write_config("[vm_defaults]\nimage = 'toy:hello'\n")
    assert default_image()["detail"] == "toy:hello: the source toy (example) provides it on first use"
    benv.write_config("[vm_defaults]\nimage = 'nowhere'\n")
    got = default_image()
    assert got["status"] == "FAIL" and "no enabled source provides it" in got["detail"]


def test_exec_options_and_before_exec_and_vm_egress_through_vm_run_plans(fcenv):
    """vm exec takes plugins' exec options as flags; vm run asks every plugin's
    before_exec before it makes a VM (--dry-run stops there and shows what they said);
    a plugin refusing there leaves nothing; ExecContext.egress() asks vm_egress."""
    env = fcenv
    try:
        help_text = env.run("vm", "exec", "--help", check=True).stdout
        assert "--cheer" in help_text and "--auto-prepare" in help_text and "--force" in help_text
        r = env.run("vm", "run", "--dry-run", "--name", "plan1", "--", "true", check=True)
        assert "example: would greet plan1 with 'hello' (egress: False)" in r.stderr, r.stderr
        assert "would make plan1:" in r.stderr and "then run: true" in r.stderr
        r = env.run("vm", "run", "--dry-run", "--name", "plan2", "--motto", "egress", "--", "true", check=True)
        assert "(egress: True)" in r.stderr, r.stderr
        # the motto "refuse": refused before any VM exists, naming the plugin and the hook
        r = env.run("vm", "run", "--name", "plan3", "--motto", "refuse", "--", "true")
        assert r.returncode == 1 and "example: before_exec: the motto 'refuse' refuses every run" in r.stderr, r.stderr
        assert rows(env) == [] and not list((env.state_dir / "vms").glob("*"))
        # a bare word that is not a directory, before --: what was meant is said
        r = env.run("vm", "run", "echo", "hi")
        assert r.returncode == 1 and "did you mean `banger vm run -- echo hi`" in r.stderr, r.stderr
        r = env.run("vm", "run", ".", "echo")
        assert r.returncode == 1 and "did you mean `banger vm run . -- echo`" in r.stderr, r.stderr
        assert env.run("vm", "run", "--readonly", ".", "--", "true").returncode == 2  # not an option
        assert rows(env) == []
        # exec options are validated through the daemon: a VM (the fake VMM: no agent to run in)
        fc_create(env, "ex", None)
        r = env.run("vm", "exec", "--cheer", "ex", "--", "true")
        assert r.returncode == 1 and "has no agent" in r.stderr  # refused by the agent, before any hook
        r = env.run("vm", "exec", "ex", "--cheer", "--", "echo", "a b")  # options after the VM: said how
        assert r.returncode == 1 and "did you mean `banger vm exec --cheer ex -- echo 'a b'`" in r.stderr, r.stderr
    finally:
        env.run("vm", "delete", "--force", "ex", timeout=60)
        env.stop_daemon()
