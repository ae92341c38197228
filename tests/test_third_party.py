"""Out-of-tree plugins installed with pip, driven through the CLI and the daemon."""

from __future__ import annotations

import json
import re
import socket

import pytest

from conftest import make_dist, pid_alive, wait_for

from banger_core.builtin import BUILTIN
from banger_core import PROTOCOL_VERSION

FIRST_PARTY = {"agent", "debian", "oci", "network", "nat", "dns", "ssh", "workdisk", "filesync", "workspace"}
BUILTINS = [name for name, _module in BUILTIN]  # registered first, in this order


@pytest.fixture
def xenv(example_env):
    return example_env


def plugins_json(env) -> dict:
    return json.loads(env.run("plugins", "list", "--json", check=True).stdout)


@pytest.mark.oci
def test_first_party_plugins_listed_in_dependency_order(benv):
    data = plugins_json(benv)
    names = {p["name"] for p in data["plugins"] if not p["builtin"]}
    assert names == FIRST_PARTY
    assert [p["name"] for p in data["plugins"] if p["builtin"]] == data["order"][: len(BUILTINS)] == BUILTINS
    order = data["order"]
    assert order.index("network") < order.index("nat") and order.index("network") < order.index("dns")
    assert order.index("agent") < order.index("workspace") and order.index("workdisk") < order.index("workspace")
    assert order.index("workdisk") < order.index("filesync") and order.index("agent") < order.index("ssh")
    assert order.index("debian") < order.index("oci")  # oci requires the busybox service debian provides
    for p in data["plugins"]:
        dist = "banger" if p["builtin"] else f"banger-{p['name']}"
        assert p["distribution"] == dist and p["status"] == "enabled" and p["version"]
    text = benv.run("plugins", "list", check=True).stdout
    assert "order: " + " -> ".join(order) in text


def test_example_plugin_discovered_and_ordered_by_requires(xenv):
    data = plugins_json(xenv)
    ex = next(p for p in data["plugins"] if p["name"] == "example")
    assert ex["distribution"] == "banger-example" and ex["version"] == "1.2.3" and ex["status"] == "enabled"
    assert ex["requires"] == ["dns"]
    assert set(ex["hooks"]) >= {
        "prepare_host",
        "configure_machine",
        "post_boot",
        "cleanup",
        "reconcile",
        "register_commands",
        "register_rpc_methods",
        "register_doctor_checks",
    }
    order = data["order"]
    assert order.index("dns") < order.index("example") and order.index("network") < order.index("example")


def test_example_plugin_configured_from_config_and_project_via_daemon(xenv, tmp_path):
    r = xenv.run("example", "greet", "bob", check=True)
    assert r.stdout.strip() == "hello, bob!"
    xenv.write_config("[example]\ngreeting = 'hi'\ntimes = 2\n")
    assert xenv.run("example", "greet", "bob", check=True).stdout.strip() == "hi, bob! hi, bob!"
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "banger.toml").write_text("[example]\ngreeting = 'yo'\n")
    r = xenv.run("example", "greet", "bob", "--project", str(proj), check=True)
    assert r.stdout.strip() == "yo, bob! yo, bob!"  # project's greeting, user's times
    xenv.write_config("[example]\ntimes = 11\n")
    r = xenv.run("example", "greet", "bob")
    assert r.returncode == 1
    assert f"{xenv.config_file}: [example] times: Input should be less than or equal to 10 (got 11)" in r.stderr
    assert "(config_error, op-" in r.stderr  # the error came back over RPC with its code and op id


def test_example_plugin_rpc_param_validation(xenv):
    r = xenv.run("example", "greet", "")
    assert r.returncode == 1
    assert "example.greet: invalid params: name: String should have at least 1 character" in r.stderr


def test_lifecycle_hooks_called_in_order_with_settings(xenv, tmp_path):
    record = tmp_path / "calls.jsonl"
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "banger.toml").write_text(f"[example]\ngreeting = 'from-project'\nrecord = '{record}'\n")
    out = xenv.python(
        f"""
        import json
        from pathlib import Path
        from banger_core.testing import run_lifecycle, sample_vm
        vm, machine = run_lifecycle(vm=sample_vm("demo", project_dir=Path({str(proj)!r})))
        print(json.dumps({{"teardown": vm.teardown, "boot_args": machine.boot_args}}))
        """
    )
    result = json.loads(out.stdout)
    calls = [json.loads(ln) for ln in record.read_text().splitlines()]
    assert [c["hook"] for c in calls] == ["prepare_host", "configure_machine", "post_boot", "cleanup"]
    assert calls[0]["greeting"] == "from-project" and all(c["vm"] == "demo" for c in calls)
    assert calls[-1]["teardown"] == "made"  # cleanup saw what prepare_host recorded
    assert result["teardown"]["example"] == {"example": "made"}
    assert "example.greeting=from-project" in result["boot_args"]


def test_reconcile_runs_at_daemon_start(xenv, tmp_path):
    record = tmp_path / "calls.jsonl"
    xenv.write_config(f"[example]\nrecord = '{record}'\n")
    xenv.run("daemon", "start", check=True)
    # reconcile first, then the daemon-lifetime services start (before any request)
    assert [json.loads(ln)["hook"] for ln in record.read_text().splitlines()] == ["reconcile", "service.start"]


def test_client_disconnect_cancels_in_flight_handler(xenv, tmp_path):
    xenv.run("daemon", "start", check=True)
    pid = xenv.daemon_pid()
    marker = tmp_path / "marker"
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(xenv.socket))
    req = {"v": PROTOCOL_VERSION, "method": "example.wait", "params": {"marker": str(marker)}, "op_id": "op-abcabcabcabc"}
    s.sendall(json.dumps(req).encode() + b"\n")
    wait_for(lambda: marker.exists() and marker.read_text().startswith("started"))
    s.close()
    wait_for(lambda: marker.read_text().startswith("cancelled"))
    assert marker.read_text().strip() == "cancelled op-abcabcabcabc"
    assert pid_alive(pid)
    log = (xenv.state_dir / "bangerd.log").read_text()
    assert "request example.wait cancelled: client disconnected" in log
    assert xenv.run("example", "greet", "again", check=True).stdout.strip() == "hello, again!"


def test_example_doctor_check_runs(xenv):
    r = xenv.run("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["example: greeting"]["status"] == "PASS" and checks["example: greeting"]["detail"] == "hello"


def test_plugin_raising_on_import_is_broken_and_everything_still_works(xenv, tmp_path):
    bad = tmp_path / "bad"
    make_dist(bad, "banger-kaboom", "kaboom", "raise RuntimeError('kaboom at import')\n")
    xenv.extra_path.append(str(bad))
    data = plugins_json(xenv)
    kb = next(p for p in data["plugins"] if p["name"] == "kaboom")
    assert kb["status"] == "broken" and kb["distribution"] == "banger-kaboom"
    assert kb["reason"] == "import failed: RuntimeError: kaboom at import"
    assert data["error"] is None and "kaboom" not in data["order"]
    text = xenv.run("plugins", "list", check=True).stdout
    assert "kaboom: import failed: RuntimeError: kaboom at import" in text
    d = xenv.run("doctor")
    assert d.returncode == 1 and "plugin kaboom" in d.stdout and "kaboom at import" in d.stdout
    assert xenv.run("example", "greet", "bob", check=True).stdout.strip() == "hello, bob!"
    xenv.run("daemon", "status", check=True)
    xenv.run("plugins", "resolve", check=True)
    strict = xenv.run("plugins", "list", BANGER_STRICT_PLUGINS="1")
    assert strict.returncode == 1 and "plugin 'kaboom' is broken: import failed" in strict.stderr


def test_plugin_requires_cycle_is_one_clear_error(xenv, tmp_path):
    d = tmp_path / "cyc"
    make_dist(d, "banger-alpha", "alpha", "requires = ['beta']\n")
    make_dist(d, "banger-beta", "beta", "requires = ['alpha']\n")
    xenv.extra_path.append(str(d))
    data = plugins_json(xenv)
    assert data["error"] in ("plugin dependency cycle: alpha -> beta -> alpha", "plugin dependency cycle: beta -> alpha -> beta")
    r = xenv.run("plugins", "resolve")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "plugin dependency cycle:" in r.stderr
    doc = xenv.run("doctor")
    assert doc.returncode == 1 and "FAIL  plugin order" in doc.stdout
    # disabling one side of the cycle fixes it
    xenv.write_config("[plugins]\ndisable = ['beta']\n")
    r = xenv.run("plugins", "resolve")
    assert r.returncode == 1 and "alpha requires beta, which is disabled" in r.stderr


@pytest.mark.oci  # its message names every disabled plugin
def test_missing_requirement_is_one_clear_error(xenv, tmp_path):
    d = tmp_path / "miss"
    make_dist(d, "banger-needy", "needy", "requires = ['teleporter']\n")
    xenv.extra_path.append(str(d))
    data = plugins_json(xenv)
    assert data["error"] == "needy requires teleporter, which is not installed"
    r = xenv.run("plugins", "resolve")
    assert r.returncode == 1 and r.stderr.strip() == "banger: needy requires teleporter, which is not installed (plugin_error)"


def test_plugin_disabled_in_config(xenv):
    xenv.write_config("[plugins]\ndisable = ['example']\n")
    ex = next(p for p in plugins_json(xenv)["plugins"] if p["name"] == "example")
    assert ex["status"] == "disabled" and ex["reason"] == "disabled in config"
    r = xenv.run("example", "greet", "bob")
    assert r.returncode == 2 and "No such command 'example'" in r.stderr
    env_off = next(
        p
        for p in json.loads(xenv.run("plugins", "list", "--json", BANGER_DISABLE_PLUGINS="nat,example").stdout)["plugins"]
        if p["name"] == "nat"
    )
    assert env_off["status"] == "disabled"


def test_allow_list_keeps_only_named_plugins(xenv):
    xenv.write_config("[plugins]\nenable = ['agent', 'network', 'dns', 'example']\n")
    data = plugins_json(xenv)
    rest = data["order"][len(BUILTINS) :]
    # network requires the agent (a restored VM's own address), dns the network
    assert rest[:2] == ["agent", "network"] and sorted(rest) == ["agent", "dns", "example", "network"]


def test_register_commands_failure_marks_plugin_broken_cli_survives(xenv, tmp_path):
    d = tmp_path / "cmdfail"
    make_dist(
        d,
        "banger-cmdfail",
        "cmdfail",
        """
        from banger_core import hookimpl
        requires = []
        @hookimpl
        def register_commands(app):
            raise ValueError("no commands today")
        """,
    )
    xenv.extra_path.append(str(d))
    r = xenv.run("plugins", "list", check=True)
    assert "cmdfail: register_commands failed: ValueError: no commands today" in r.stdout
    assert xenv.run("example", "greet", "x", check=True).returncode == 0


def test_register_rpc_methods_failure_marks_plugin_broken_in_daemon(xenv, tmp_path):
    d = tmp_path / "rpcfail"
    make_dist(
        d,
        "banger-rpcfail",
        "rpcfail",
        """
        from banger_core import hookimpl
        requires = []
        @hookimpl
        def register_rpc_methods(register):
            register("rpcfail.ok", lambda p, c: 1)
            register("not-namespaced", lambda p, c: 2)
        """,
    )
    xenv.extra_path.append(str(d))
    xenv.run("daemon", "start", check=True)
    st = json.loads(xenv.run("daemon", "status", "--json", check=True).stdout)
    assert "may only register methods named 'rpcfail.*'" in st["broken"]["rpcfail"]
    assert "rpcfail" not in st["plugins"] and "example" in st["plugins"]
    assert "rpcfail.ok" not in st["methods"]  # nothing half-registered
    assert "example.greet" in st["methods"]


def test_env_disable_is_reported_and_reaches_the_daemon(xenv):
    xenv.run("daemon", "start", check=True)
    ex = next(p for p in plugins_json_env(xenv, BANGER_DISABLE_PLUGINS="example") if p["name"] == "example")
    assert ex["reason"] == "disabled by BANGER_DISABLE_PLUGINS"
    # the daemon started without the variable was replaced by one that honours it
    xenv.run("daemon", "start", check=True, BANGER_DISABLE_PLUGINS="example")
    st = json.loads(xenv.run("daemon", "status", "--json", BANGER_DISABLE_PLUGINS="example").stdout)
    assert "example" not in st["plugins"] and "example.greet" not in st["methods"]


def plugins_json_env(env, **over) -> list[dict]:
    return json.loads(env.run("plugins", "list", "--json", check=True, **over).stdout)["plugins"]


def test_allow_list_naming_uninstalled_plugin_warns(xenv):
    xenv.write_config("[plugins]\nenable = ['network', 'nope']\n")
    r = xenv.run("doctor")
    assert re.search(r"^WARN +config plugins +.*\[plugins\] enable names uninstalled nope", r.stdout, re.M), r.stdout
