"""Opt-in plugins and per-project enablement, through the real CLI, daemon and guests.

An opt-in plugin (``opt_in = True``) is installed and loaded but acts on no VM until a
project's banger.toml (or the user's allow-list) names it; naming it brings what it
requires. Two VMs, one made from such a project and one not: only the first is touched.
"""

from __future__ import annotations

import json
import re

import pytest

import guest_assets as ga
from conftest import isolated_env, make_dist, wait_for

BOOT_TIMEOUT = 180

# An opt-in plugin that requires another opt-in plugin (by capability): both leave a
# line per VM they prepare, and the first adds a kernel argument the console shows.
OPTIN = """
import os

from banger_core import hookimpl

opt_in = True
requires = ["tracing"]


@hookimpl
def prepare_host(ctx):
    with open(os.environ["OPTIN_LOG"], "a") as fh:
        fh.write(f"optin {ctx.vm.name}\\n")


@hookimpl
def configure_machine(ctx, machine):
    machine.boot_args.append("optin.enabled=1")
"""

TRACER = """
import os

from banger_core import hookimpl

opt_in = True
provides = ["tracing"]


@hookimpl
def prepare_host(ctx):
    with open(os.environ["OPTIN_LOG"], "a") as fh:
        fh.write(f"tracer {ctx.vm.name}\\n")
"""


def install(env, root) -> None:
    make_dist(root / "optin", "banger-optin", "optin", OPTIN)
    make_dist(root / "tracer", "banger-tracer", "tracer", TRACER)
    env.extra_path += [str(root / "optin"), str(root / "tracer")]
    env.extra_env["OPTIN_LOG"] = str(root / "optin.log")


def resolve(env, project=None) -> dict:
    args = ["plugins", "resolve", "--json"] + (["--project", str(project)] if project else [])
    return json.loads(env.run(*args, check=True).stdout)


def test_opt_in_plugins_are_off_until_a_project_names_them(benv, tmp_path):
    install(benv, tmp_path)
    listed = {p["name"]: p for p in json.loads(benv.run("plugins", "list", "--json", check=True).stdout)["plugins"]}
    assert listed["optin"]["opt_in"] and listed["optin"]["status"] == "enabled"
    assert "enabled (opt-in)" in benv.run("plugins", "list", check=True).stdout
    assert not {"optin", "tracer"} & set(resolve(benv)["order"])

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "banger.toml").write_text("[plugins]\nenable = ['optin']\n")
    order = resolve(benv, proj)["order"]
    assert order.index("tracer") < order.index("optin")  # brought in, and before
    assert "network" in order  # enable turns plugins on; it does not narrow the set

    (proj / "banger.toml").write_text("[plugins]\nenable = ['optin']\ndisable = ['tracer']\n")
    r = benv.run("plugins", "resolve", "--project", str(proj))
    assert r.returncode == 1
    assert f"optin requires tracing, which is provided by tracer, which is disabled by {proj / 'banger.toml'}" in r.stderr

    # The user's allow-list turns an opt-in plugin on for every VM (bringing nothing
    # the allow-list leaves out: the requirement is named instead).
    benv.write_config("[plugins]\nenable = ['optin', 'tracer']\n")
    assert resolve(benv)["order"][-2:] == ["tracer", "optin"]
    benv.write_config("[plugins]\nenable = ['optin']\n")
    r = benv.run("plugins", "resolve")
    assert r.returncode == 1 and "optin requires tracing, which no loaded plugin provides (disabled, so not" in r.stderr
    assert "tracer" in r.stderr


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    assets = ga.busybox_assets()
    root = tmp_path_factory.mktemp("optin")
    with isolated_env() as env:
        install(env, root)
        env.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n")
        env.run("kernel", "import", "debian-cloud", "--from", str(assets["kernel_dir"]), check=True)
        env.run("image", "register", "busybox", "--rootfs", str(assets["rootfs"]), "--kernel-ref", "debian-cloud", check=True)
        yield env, root
        env.run("vm", "delete", "--force", "inproj", "outside", timeout=180)


@pytest.mark.slow
def test_a_project_enabled_plugin_acts_on_that_projects_vms_only(guests):
    env, root = guests
    proj = root / "proj"
    proj.mkdir()
    (proj / "banger.toml").write_text("[plugins]\nenable = ['optin']\n")
    common = ["--image", "busybox", "--vcpu", "1", "--memory", "256M", "--root-size", "256M"]
    env.run("vm", "create", "--name", "inproj", "--project", str(proj), *common, timeout=300, check=True)
    env.run("vm", "create", "--name", "outside", *common, timeout=300, check=True)

    def console(name: str) -> str:
        return env.run("vm", "logs", name, "-n", "0", check=True).stdout

    for name in ("inproj", "outside"):
        wait_for(lambda n=name: re.search(ga.BOOT_MARKER, console(n)), timeout=BOOT_TIMEOUT, interval=0.5)
    assert "optin.enabled=1" in console("inproj")
    assert "optin.enabled=1" not in console("outside")
    assert (root / "optin.log").read_text().splitlines() == ["tracer inproj", "optin inproj"]
