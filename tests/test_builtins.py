"""Built-in plugins and the CLI's fast path, through the real CLI and daemon.

The core's commands, RPC methods and doctor checks come from built-in plugins
registered through the same hooks as any plugin; the essential ones refuse to be
disabled. While the command index is current, a command loads only the built-in that
provides it and the plugins the index names for it: no other plugin is imported.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_dist

from banger_core.builtin import BUILTIN, COMMANDS, ESSENTIAL

BUILTINS = [name for name, _module in BUILTIN]

# A plugin that leaves a mark each time it is imported, and adds a `banger vm` subcommand.
MARKING_PLUGIN = """
import os
import sys

from banger_core import hookimpl

with open(os.environ["MARK_FILE"], "a") as fh:  # who imported it: the CLI or the daemon
    fh.write(os.path.basename(sys.argv[0]) + "\\n")


@hookimpl
def register_commands(app, vm):
    import typer

    @vm.command("marked")
    def marked() -> None:
        typer.echo("marked plugin's vm subcommand ran")
"""


@pytest.fixture
def xenv(benv, example_plugin_dir, tmp_path):
    benv.extra_path.append(str(example_plugin_dir))
    make_dist(tmp_path / "marking", "banger-marking", "marking", MARKING_PLUGIN)
    benv.extra_path.append(str(tmp_path / "marking"))
    benv.extra_env["MARK_FILE"] = str(tmp_path / "marks")
    return benv


def _marks(env) -> int:
    """How many times a CLI process has imported the marking plugin."""
    try:
        return Path(env.extra_env["MARK_FILE"]).read_text().splitlines().count("banger")
    except FileNotFoundError:
        return 0


def test_builtins_listed_first_and_essential(benv):
    data = json.loads(benv.run("plugins", "list", "--json", check=True).stdout)
    builtin = [p for p in data["plugins"] if p["builtin"]]
    assert [p["name"] for p in builtin] == BUILTINS == data["order"][: len(BUILTINS)]
    assert all(p["essential"] == (p["name"] in ESSENTIAL) and p["distribution"] == "banger" for p in builtin)
    text = benv.run("plugins", "list", check=True).stdout
    assert "banger (built-in)" in text
    # every top-level command the CLI shows comes from the built-in COMMANDS names
    help_text = benv.run("--help", check=True).stdout
    for command in COMMANDS:
        assert command in help_text


@pytest.mark.parametrize("how", ["config", "env", "project"])
def test_disabling_an_essential_builtin_is_refused(benv, tmp_path, how):
    if how == "config":
        benv.write_config("[plugins]\ndisable = ['vm']\n")
        r = benv.run("vm", "list")
    elif how == "env":
        r = benv.run("vm", "list", BANGER_DISABLE_PLUGINS="doctor")
    else:
        (tmp_path / "banger.toml").write_text("[plugins]\ndisable = ['image']\n")
        r = benv.run("plugins", "resolve", "--project", str(tmp_path))
    assert r.returncode == 1, r
    assert "built into banger and cannot be disabled" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not benv.socket.exists()  # refused before any daemon started


def test_an_allow_list_keeps_the_builtins(benv):
    benv.write_config("[plugins]\nenable = ['agent', 'network']\n")
    data = json.loads(benv.run("plugins", "resolve", "--json", check=True).stdout)
    assert data["order"] == [*BUILTINS, "agent", "network"]


def test_fast_path_imports_only_what_the_command_needs(xenv):
    try:
        # A full load (no index yet) imports every plugin and writes the index.
        assert "marked" in xenv.run("vm", "--help", check=True).stdout
        assert _marks(xenv) == 1
        index = json.loads((xenv.root / "cache" / "cli-index.json").read_text())
        assert index["commands"]["vm marked"] == ["marking"]
        assert index["commands"]["vm hello"] == ["example"]
        assert index["commands"]["example"] == ["example"]

        # Core commands: no plugin imported, and neither pydantic nor the config loaded
        # (a daemon already running: starting one checks the config first).
        xenv.run("daemon", "start", check=True)
        r = xenv.run("vm", "list", "--json", check=True, PYTHONPROFILEIMPORTTIME="1")
        assert json.loads(r.stdout) == []
        imported = r.stderr
        assert "banger_example" not in imported and "pydantic" not in imported and "banger_core.config" not in imported
        assert _marks(xenv) == 1  # not imported again

        # vm exec: the plugins adding flags to it are loaded, but their models are not
        # built (the workspace's module of them, pydantic, not imported) unless a command
        # line gives one of those flags or asks for help
        assert "example" in index["commands"]["vm exec"] and "workspace" in index["commands"]["vm exec"]
        r = xenv.run("vm", "exec", "nosuch", "--", "true", PYTHONPROFILEIMPORTTIME="1")
        assert r.returncode == 1 and "nosuch" in r.stderr and "banger_workspace.settings" not in r.stderr
        r = xenv.run("vm", "exec", "--cheer", "nosuch", "--", "true", PYTHONPROFILEIMPORTTIME="1")
        assert r.returncode == 1 and "nosuch" in r.stderr and "banger_workspace.settings" in r.stderr  # a known flag

        # A plugin's vm subcommand: that plugin only.
        r = xenv.run("vm", "marked", check=True, PYTHONPROFILEIMPORTTIME="1")
        assert "marked plugin's vm subcommand ran" in r.stdout
        assert _marks(xenv) == 2 and "banger_example" not in r.stderr

        r = xenv.run("vm", "hello", "nope", PYTHONPROFILEIMPORTTIME="1")
        assert r.returncode == 1 and "nope" in r.stderr and "banger_t_marking" not in r.stderr
        assert _marks(xenv) == 2

        # The index follows the config: disabling the plugin removes its command at once.
        xenv.write_config("[plugins]\ndisable = ['marking']\n")
        r = xenv.run("vm", "marked")
        assert r.returncode == 2 and "No such command" in r.stderr
        index = json.loads((xenv.root / "cache" / "cli-index.json").read_text())
        assert "vm marked" not in index["commands"] and index["commands"]["vm hello"] == ["example"]
    finally:
        xenv.stop_daemon()


def test_a_broken_or_unreadable_index_means_a_full_load(xenv):
    try:
        xenv.run("plugins", "list", check=True)
        path = xenv.root / "cache" / "cli-index.json"
        path.write_text("{not json")
        assert "marked plugin's vm subcommand ran" in xenv.run("vm", "marked", check=True).stdout
        assert json.loads(path.read_text())["commands"]["vm marked"] == ["marking"]  # rewritten
    finally:
        xenv.stop_daemon()


def test_a_non_essential_builtin_can_be_disabled(benv):
    assert "catalog" not in ESSENTIAL and "catalog" in BUILTINS
    checks = {c["name"] for c in json.loads(benv.run("doctor", "--json").stdout)["checks"]}
    assert {"catalog", "debian: kernel build", "debian: image build"} <= checks
    benv.write_config("[plugins]\ndisable = ['catalog']\n")
    listed = {p["name"]: p for p in json.loads(benv.run("plugins", "list", "--json", check=True).stdout)["plugins"]}
    assert listed["catalog"]["status"] == "disabled" and listed["catalog"]["reason"] == "disabled in config"
    checks = {c["name"] for c in json.loads(benv.run("doctor", "--json").stdout)["checks"]}
    assert "catalog" not in checks and {"python", "debian: kernel build"} <= checks  # its checks go with it
    benv.write_config("")
    r = benv.run("plugins", "list", "--json", check=True, BANGER_DISABLE_PLUGINS="catalog")
    listed = {p["name"]: p for p in json.loads(r.stdout)["plugins"]}
    assert listed["catalog"]["reason"] == "disabled by BANGER_DISABLE_PLUGINS"


def test_doctor_checks_the_memory_dir_where_guest_ram_lives(benv, tmp_path):
    def check(**env: str) -> dict:
        out = json.loads(benv.run("doctor", "--json", **env).stdout)["checks"]
        return next(c for c in out if c["name"] == "memory dir")

    got = check()  # the env's own, under /dev/shm: not made yet
    assert got["status"] == "PASS" and "(tmpfs, " in got["detail"] and "created on first use" in got["detail"], got
    disk = tmp_path / "mem"
    got = check(BANGER_MEMORY_DIR=str(disk))
    assert got["status"] == "WARN" and "not a tmpfs" in got["detail"], got
    disk.mkdir(mode=0o755)
    disk.chmod(0o755)
    got = check(BANGER_MEMORY_DIR=str(disk))
    assert got["status"] == "FAIL" and "want 0700" in got["detail"], got
