"""Config loading: errors name the file, table and key; project files layer on top."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from banger_core.config import Config, ProjectConfig
from banger_core.errors import BangerError
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
