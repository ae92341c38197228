"""Config loading: errors name the file, table and key; project files layer on top."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from banger_core import host
from banger_core.config import DEFAULT_IMAGE, Config, ProjectConfig, VMDefaultsTable, resolve_vm_defaults
from banger_core.errors import BangerError, ErrorCode
from banger_core.paths import Paths


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_missing_config_is_defaults(tmp_path):
    cfg = Config.load(tmp_path / "nope.toml")
    assert cfg.core.daemon.log_level == "info"
    assert cfg.core.plugins.enable is None and cfg.core.plugins.disable == []


def test_invalid_toml_names_file(tmp_path):
    p = write(tmp_path / "config.toml", "[daemon\nlog_level = 1\n")
    with pytest.raises(BangerError) as ei:
        Config.load(p)
    assert ei.value.message.startswith(f"{p}: invalid TOML")


def test_core_value_error_names_file_table_key_and_expected(tmp_path):
    p = write(tmp_path / "config.toml", '[daemon]\nlog_level = "loud"\n')
    with pytest.raises(BangerError) as ei:
        Config.load(p)
    msg = ei.value.message
    assert msg.startswith(f"{p}: [daemon] log_level: Input should be 'debug', 'info', 'warning' or 'error'")
    assert "(got 'loud')" in msg


def test_unknown_core_key_rejected(tmp_path):
    p = write(tmp_path / "config.toml", "[plugins]\nenabled = ['dns']\n")
    with pytest.raises(BangerError, match=r"\[plugins\] enabled: Extra inputs are not permitted"):
        Config.load(p)


def test_enable_and_disable_same_plugin_rejected(tmp_path):
    p = write(tmp_path / "config.toml", "[plugins]\nenable = ['dns']\ndisable = ['dns']\n")
    with pytest.raises(BangerError, match=r"both enabled and disabled: dns"):
        Config.load(p)


def test_plugin_table_must_be_a_table(tmp_path):
    p = write(tmp_path / "config.toml", "dns = 3\n")
    with pytest.raises(BangerError, match=r"dns: expected a table \[dns\], got int"):
        Config.load(p)


def test_allow_and_block_lists(tmp_path):
    p = write(tmp_path / "config.toml", "[plugins]\nenable = ['a', 'b']\ndisable = ['c']\n")
    cfg = Config.load(p)
    assert cfg.globally_disabled(["a", "b", "c", "d"]) == {"c", "d"}


def test_project_file_validation_names_project_file(tmp_path):
    p = write(tmp_path / "proj" / "banger.toml", "[plugins]\ndisable = 'dns'\n")
    with pytest.raises(BangerError) as ei:
        ProjectConfig.load(p.parent)
    assert ei.value.message.startswith(f"{p}: [plugins] disable: Input should be a valid list")


# --- a project's [vm_defaults] ------------------------------------------------------------


def test_project_vm_defaults_parse_and_set_only_the_keys_given(tmp_path):
    p = write(tmp_path / "proj" / "banger.toml", '[vm_defaults]\nmemory_mib = "512M"\nvcpus = 2\n[dns]\nttl = 7\n')
    proj = ProjectConfig.load(p.parent)
    assert proj is not None
    assert (proj.vm_defaults.memory_mib, proj.vm_defaults.vcpus) == (512, 2)
    assert proj.vm_defaults.model_fields_set == {"memory_mib", "vcpus"}
    assert "vm_defaults" not in proj.tables and proj.tables == {"dns": {"ttl": 7}}  # not a plugin's table
    none = ProjectConfig.load(write(tmp_path / "bare" / "banger.toml", "[dns]\nttl = 7\n").parent)
    assert none is not None and none.vm_defaults.model_fields_set == set()
    full = "[vm_defaults]\nvcpus = 1\nmemory_mib = 300\nroot_size_mib = '2G'\nimage = 'img'\nkernel = 'microvm-6.1'\n"
    proj = ProjectConfig.load(write(tmp_path / "full" / "banger.toml", full).parent)
    assert proj is not None
    assert proj.vm_defaults.model_dump() == {
        "vcpus": 1,
        "memory_mib": 300,
        "root_size_mib": 2048,
        "image": "img",
        "kernel": "microvm-6.1",
    }


def test_project_vm_defaults_override_the_users_key_by_key():
    user = VMDefaultsTable.model_validate({"vcpus": 3, "memory_mib": "1G", "root_size_mib": "8G", "image": "mine"})
    project = VMDefaultsTable.model_validate({"memory_mib": "512M", "kernel": "microvm-6.1"})
    got = resolve_vm_defaults(user, project)
    assert got == {
        "vcpus": (3, "config"),
        "memory_mib": (512, "project"),
        "root_size_mib": (8192, "config"),
        "image": ("mine", "config"),  # the project sets memory alone: the user's image stays
        "kernel": ("microvm-6.1", "project"),
    }
    # no project (or an empty [vm_defaults]): the user's, then the host's, then builtin
    assert resolve_vm_defaults(user) == resolve_vm_defaults(user, VMDefaultsTable()) != got
    bare = resolve_vm_defaults(VMDefaultsTable(), VMDefaultsTable.model_validate({"image": "theirs", "vcpus": 1}))
    assert bare == {
        "vcpus": (1, "project"),
        "memory_mib": (host.default_memory_mib(), "auto"),
        "root_size_mib": (4096, "builtin"),
        "image": ("theirs", "project"),
        "kernel": (None, "builtin"),
    }
    assert resolve_vm_defaults(VMDefaultsTable())["image"] == (DEFAULT_IMAGE, "builtin")


@pytest.mark.parametrize(
    "text, says",
    [
        ("[vm_defaults]\nvcpu = 2\n", "[vm_defaults] vcpu: Extra inputs are not permitted (got 2)"),
        ("[vm_defaults]\nvcpus = '2'\n", "[vm_defaults] vcpus: Input should be a valid integer (got '2')"),
        ("[vm_defaults]\nvcpus = 0\n", "[vm_defaults] vcpus: Input should be greater than 0 (got 0)"),
        ("[vm_defaults]\nimage = 7\n", "[vm_defaults] image: Input should be a valid string (got 7)"),
        ("[vm_defaults]\nmemory_mib = true\n", "[vm_defaults] memory_mib: Value error, expected a size"),
        ("[vm_defaults]\nmemory_mib = 'lots'\n", "[vm_defaults] memory_mib: Value error, cannot parse size 'lots'"),
        ("[vm_defaults]\nroot_size_mib = '0G'\n", "[vm_defaults] root_size_mib: Value error, size must be at least 1 MiB"),
        ("vm_defaults = 3\n", "[vm_defaults] (table): Input should be a valid dictionary"),
        ("vm_defaults = [1]\n", "[vm_defaults] (table): Input should be a valid dictionary"),
    ],
)
def test_project_vm_defaults_errors_name_the_file_table_and_key(tmp_path, text, says):
    p = write(tmp_path / "proj" / "banger.toml", text)
    with pytest.raises(BangerError) as ei:
        ProjectConfig.load(p.parent)
    assert ei.value.code is ErrorCode.CONFIG
    assert ei.value.message.startswith(f"{p}: {says}"), ei.value.message


def test_paths_env_overrides(tmp_path):
    env = {
        "BANGER_CONFIG_DIR": str(tmp_path / "c"),
        "BANGER_STATE_DIR": str(tmp_path / "s"),
        "BANGER_CACHE_DIR": str(tmp_path / "k"),
        "BANGER_RUNTIME_DIR": str(tmp_path / "r"),
        "HOME": str(tmp_path),
    }
    p = Paths.from_env(env)
    assert p.config_file == tmp_path / "c" / "config.toml"
    assert p.db_file == tmp_path / "s" / "banger.db"
    assert p.socket == tmp_path / "r" / "bangerd.sock"
    xdg = Paths.from_env({"XDG_CONFIG_HOME": "/x/cfg", "XDG_STATE_HOME": "/x/st", "XDG_RUNTIME_DIR": "/run/user/7"})
    assert xdg.config_dir == Path("/x/cfg/banger") and xdg.state_dir == Path("/x/st/banger")
    assert xdg.runtime_dir == Path("/run/user/7/banger")
    bare = Paths.from_env({})
    assert bare.runtime_dir == Path(f"/tmp/banger-{os.getuid()}")


# --- through the CLI, with the real first-party plugins ----------------------------------


def test_cli_invalid_plugin_value_names_file_table_key(benv):
    benv.write_config("[dns]\nport = 'high'\n")
    r = benv.run("plugins", "resolve")
    assert r.returncode == 1
    assert f"banger: {benv.config_file}: [dns] port: Input should be a valid integer" in r.stderr
    d = benv.run("doctor")
    assert d.returncode == 1
    assert "FAIL  settings dns" in d.stdout and "[dns] port" in d.stdout


def test_cli_invalid_toml_every_command_says_so_and_doctor_reports(benv):
    benv.write_config("[daemon\n")
    r = benv.run("plugins", "list")
    assert r.returncode == 1 and f"banger: {benv.config_file}: invalid TOML" in r.stderr
    d = benv.run("doctor")
    assert d.returncode == 1 and "FAIL  config" in d.stdout
    assert benv.run("--version").returncode == 0


def test_cli_project_file_overrides_user_settings_and_plugins(benv, tmp_path):
    benv.write_config("[dns]\nttl = 30\nport = 5353\n[plugins]\ndisable = ['filesync']\n")
    proj = tmp_path / "proj"
    write(proj / "banger.toml", "[plugins]\ndisable = ['workspace']\n[dns]\nttl = 7\n")
    r = benv.run("plugins", "resolve", "--project", str(proj), "--json", check=True)
    data = json.loads(r.stdout)
    assert data["project_file"] == str(proj / "banger.toml")
    assert "workspace" not in data["order"] and "filesync" not in data["order"]
    assert data["settings"]["dns"]["ttl"] == 7  # project wins
    assert data["settings"]["dns"]["port"] == 5353  # user's kept
    user_only = json.loads(benv.run("plugins", "resolve", "--json", check=True).stdout)
    assert user_only["settings"]["dns"]["ttl"] == 30 and "workspace" in user_only["order"]


def test_cli_project_bad_value_names_project_file(benv, tmp_path):
    proj = tmp_path / "proj"
    write(proj / "banger.toml", "[[file_sync]]\nhost = '/etc/hosts'\nguest = '/etc/x'\n")
    r = benv.run("plugins", "resolve", "--project", str(proj))
    assert r.returncode == 1
    assert f"{proj / 'banger.toml'}: file_sync[0].guest: Value error, the guest path must lie under ~" in r.stderr


def test_cli_project_disabling_a_requirement_is_one_clear_error(benv, tmp_path):
    proj = tmp_path / "proj"
    write(proj / "banger.toml", "[plugins]\ndisable = ['network']\n")
    r = benv.run("plugins", "resolve", "--project", str(proj))
    assert r.returncode == 1
    assert f"banger: dns requires net, which is provided by network, which is disabled by {proj / 'banger.toml'}" in r.stderr
    assert "nat requires net" in r.stderr


def test_cli_project_enabling_unknown_plugin(benv, tmp_path):
    proj = tmp_path / "proj"
    write(proj / "banger.toml", "[plugins]\nenable = ['teleport']\n")
    r = benv.run("plugins", "resolve", "--project", str(proj))
    assert r.returncode == 1
    assert f"{proj / 'banger.toml'}: [plugins] enable: plugin 'teleport' is not installed" in r.stderr


def test_a_renamed_plugins_table_names_the_new_one(benv):
    benv.write_config("[vsock]\nport = 1024\n")
    r = benv.run("vm", "list")
    assert r.returncode == 1 and "[vsock] is now [agent] (the vsock plugin was renamed agent)" in r.stderr, r.stderr


# --- a top-level key a plugin claims: the example plugin's [[greeting_for]] ---------------

USER_GREETINGS = "[example]\ngreeting = 'hi'\n[[greeting_for]]\nname = 'ann'\ngreeting = 'howdy'\n"


def test_cli_a_claimed_key_reaches_the_plugin_through_the_daemon_and_doctor(example_env, tmp_path):
    env = example_env
    env.write_config(USER_GREETINGS)
    ex = next(p for p in json.loads(env.run("plugins", "list", "--json", check=True).stdout)["plugins"] if p["name"] == "example")
    assert ex["config_keys"] == ["greeting_for"]
    assert env.run("example", "greet", "ann", check=True).stdout.strip() == "howdy, ann!"
    assert env.run("example", "greet", "bob", check=True).stdout.strip() == "hi, bob!"
    proj = tmp_path / "proj"
    write(proj / "banger.toml", "[[greeting_for]]\nname = 'bob'\ngreeting = 'yo'\n")
    for name, said in [("bob", "yo, bob!"), ("ann", "howdy, ann!")]:  # the project's adds to the user's
        assert env.run("example", "greet", name, "--project", str(proj), check=True).stdout.strip() == said
    checks = {c["name"]: c for c in json.loads(env.run("doctor", "--json").stdout)["checks"]}
    assert checks["example: greeting"]["detail"] == "hi; 1 per-name greeting"
    # a project's item the plugin's validator refuses (SettingsSource: it is the project's)
    write(
        proj / "banger.toml",
        "[[greeting_for]]\nname = 'cy'\ngreeting = 'hey'\n[[greeting_for]]\nname = 'ann'\ngreeting = 'hey'\n",
    )
    r = env.run("example", "greet", "ann", "--project", str(proj))
    assert r.returncode == 1
    assert f"{proj / 'banger.toml'}: greeting_for[1].name: 'ann' is greeted by the user's own config.toml (got 'ann')" in r.stderr
    write(proj / "banger.toml", "[[greeting_for]]\nname = 'bob'\n")
    r = env.run("example", "greet", "bob", "--project", str(proj))
    assert r.returncode == 1 and f"{proj / 'banger.toml'}: greeting_for[0].greeting: Field required" in r.stderr


def test_cli_an_unclaimed_top_level_key_is_refused_with_a_clear_error(example_env, tmp_path):
    env = example_env
    env.write_config("[[greetings_for]]\nname = 'ann'\ngreeting = 'howdy'\n")
    says = f"{env.config_file}: greetings_for: not a banger setting: no installed plugin claims it"
    for argv in (["vm", "list"], ["plugins", "list"], ["example", "greet", "ann"]):  # the last: a plugin's command
        r = env.run(*argv)
        assert r.returncode in (1, 2) and says in r.stderr, (argv, r.stderr)
    d = env.run("doctor")
    assert d.returncode == 1 and "FAIL  config" in d.stdout and says in d.stdout
    env.write_config("")
    write(tmp_path / "proj" / "banger.toml", "[[greetings_for]]\nname = 'ann'\n")
    r = env.run("plugins", "resolve", "--project", str(tmp_path / "proj"))
    assert r.returncode == 1 and f"{tmp_path / 'proj' / 'banger.toml'}: greetings_for: not a banger setting" in r.stderr


def test_cli_vm_create_with_a_claimed_key_and_a_refused_project_leaves_nothing(fcenv, tmp_path):
    from conftest import fc_create

    env = fcenv
    env.config_file.write_text(env.config_file.read_text() + USER_GREETINGS)
    good, bad = tmp_path / "good", tmp_path / "bad"
    write(good / "banger.toml", "[[greeting_for]]\nname = 'bob'\ngreeting = 'yo'\n")
    write(bad / "banger.toml", "[[greeting_for]]\nname = 'ann'\ngreeting = 'hey'\n")
    fc_create(env, "good", good)
    shown = json.loads(env.run("vm", "show", "good", "--json", check=True).stdout)
    assert shown["fields"]["example"]["greeting_for"] == {"ann": "howdy", "bob": "yo"}
    vms_before = sorted(p.name for p in (env.state_dir / "vms").iterdir())
    r = fc_create(env, "bad", bad, check=False)
    assert r.returncode != 0 and f"{bad / 'banger.toml'}: greeting_for[0].name: 'ann' is greeted" in r.stderr
    assert [v["name"] for v in json.loads(env.run("vm", "list", "--json", check=True).stdout)] == ["good"]
    assert sorted(p.name for p in (env.state_dir / "vms").iterdir()) == vms_before
    env.run("vm", "delete", "good", "--force", check=True)


# --- a project's [vm_defaults] through the daemon: one busybox boot ------------------------


@pytest.fixture(scope="module")
def bbenv(tmp_path_factory):
    from test_cleanup_reason import busybox_env

    with busybox_env(tmp_path_factory) as env:
        yield env


@pytest.mark.slow
def test_cli_vm_create_takes_the_projects_vm_defaults_and_refuses_a_bad_one(bbenv, tmp_path):
    env = bbenv
    # the user's: image busybox (no --image below), 1 vCPU, 1 GiB
    env.config_file.write_text(env.config_file.read_text() + "[vm_defaults]\nimage = 'busybox'\nvcpus = 1\nmemory_mib = '1G'\n")

    # a bad value is refused naming the file, the table and the key, before the VM exists
    bad = tmp_path / "bad"
    write(bad / "banger.toml", "[vm_defaults]\nvcpus = 1\nmemory_mib = 'lots'\n")
    r = env.run("vm", "create", "--name", "nope", "--project", str(bad), timeout=120)
    assert r.returncode == 1
    assert f"{bad / 'banger.toml'}: [vm_defaults] memory_mib: Value error, cannot parse size 'lots'" in r.stderr, r.stderr
    assert json.loads(env.run("vm", "list", "--json", check=True).stdout) == []
    assert not (env.state_dir / "vms").exists() or list((env.state_dir / "vms").iterdir()) == []

    # the project's keys over the user's, a flag over the project's, the user's image kept
    proj = tmp_path / "proj"
    write(proj / "banger.toml", "[vm_defaults]\nvcpus = 2\nmemory_mib = '320M'\nroot_size_mib = '512M'\n")
    env.run("vm", "create", "--name", "fromproj", "--project", str(proj), "--root-size", "256M", timeout=300, check=True)
    vm = json.loads(env.run("vm", "show", "fromproj", "--json", check=True).stdout)
    assert vm["image"] == "busybox" and vm["project_dir"] == str(proj)
    assert vm["spec"] == {"vcpus": 2, "memory_mib": 320, "root_size_mib": 256, "kernel": None}
    assert (vm["machine"]["vcpus"], vm["machine"]["memory_mib"]) == (2, 320)  # what the VMM got
    env.run("vm", "delete", "--force", "fromproj", timeout=120, check=True)
