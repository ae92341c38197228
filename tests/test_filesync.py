"""The filesync plugin: ``[[file_sync]]`` entries checked at config load, copied into
real guests through the agent, owned by root, at every start and at resume.

Without a VM: each class of bad entry refused naming its index, ``~`` on each side,
modes, the old ``[filesync]`` spelling, and a project's entries kept inside the project
(symlinks followed). With VMs (a busybox-only image pulled from a local registry with
the microVM kernel, its agent on the agent disk's own python): two boots of one VM (a
create, a stop/start) and one restore from its snapshot.
"""

from __future__ import annotations

import json
import os
import shlex
import types
from pathlib import Path

import pytest

import guest_assets as ga
from banger_core.config import Config, ProjectConfig
from banger_core.errors import BangerError
from banger_core.plugins import PluginHost
from conftest import isolated_env
from oci_fixtures import missing_tools, push_layers

LONG = 1500


# --- at config load, in-process --------------------------------------------------------


def host() -> PluginHost:
    import banger_filesync

    h = PluginHost()
    h.add(banger_filesync, "filesync")
    h.add(types.ModuleType("agent_stub"), "agent")
    h.add(types.ModuleType("workdisk_stub"), "workdisk")
    h.finish_loading()
    return h


def settings(tmp_path: Path, user: str, project: str | None = None):
    (tmp_path / "config.toml").write_text(user)
    cfg = Config.load(tmp_path / "config.toml")
    h = host()
    cfg.check_claims(h)
    proj = None
    if project is not None:
        (tmp_path / "proj").mkdir(exist_ok=True)
        (tmp_path / "proj" / "banger.toml").write_text(project)
        proj = ProjectConfig.load(tmp_path / "proj")
    return cfg.settings_for(h, "filesync", proj)


def entry(host: str = "/etc/hosts", guest: str = "~/hosts", mode: str | None = None, extra: str = "") -> str:
    """One [[file_sync]] table (``extra``: raw TOML lines added to it)."""
    out = f"[[file_sync]]\nhost = {json.dumps(host)}\nguest = {json.dumps(guest)}\n"
    if mode is not None:
        out += f"mode = {json.dumps(mode)}\n"
    return out + (extra + "\n" if extra else "")


GOOD = entry("/etc/hosts", "~/a") + entry("~/.aws", "/root/.aws")


@pytest.mark.parametrize(
    ("bad", "where", "says"),
    [
        (entry(host=""), "host", "an empty path"),
        (entry(host="relative/file"), "host", "a relative path"),
        (entry(host="file"), "host", "a relative path"),
        (entry(host="./file"), "host", "a relative path"),
        (entry(host="~bob/.aws"), "host", "~user paths are not taken"),
        (entry(host="~"), "host", "the root or home directory itself"),
        (entry(host="/"), "host", "the root or home directory itself"),
        (entry(host="/srv/../etc/shadow"), "host", "'..' components are not taken"),
        (entry(host="~/.."), "host", "'..' components are not taken"),
        (entry(host="/srv/./x"), "host", "'.' components are not taken"),
        (entry(host="/srv//x"), "host", "empty components"),
        (entry(host="/srv/x/"), "host", "empty components"),
        (entry(host="/srv/x\n"), "host", "control characters"),
        (entry(host="/" + "x" * 256), "host", "path too long"),
        (entry(guest=""), "guest", "an empty path"),
        (entry(guest="/etc/passwd"), "guest", "must lie under ~"),
        (entry(guest="/rootkit/x"), "guest", "must lie under ~"),
        (entry(guest="root/x"), "guest", "a relative path"),
        (entry(guest="~"), "guest", "the home directory itself"),
        (entry(guest="/root"), "guest", "the home directory itself"),
        (entry(guest="~/"), "guest", "the home directory itself"),
        (entry(guest="~/../etc/passwd"), "guest", "'..' components are not taken"),
        (entry(guest="/root/a/../../etc"), "guest", "'..' components are not taken"),
        (entry(guest="~alice/x"), "guest", "~user paths are not taken"),
        (entry(mode="0999"), "mode", "expected a file mode as an octal string"),
        (entry(mode="4755"), "mode", "expected a file mode as an octal string"),
        (entry(mode="0o600"), "mode", "expected a file mode as an octal string"),
        (entry(mode="rw-------"), "mode", "expected a file mode as an octal string"),
        (entry(mode="600 "), "mode", "expected a file mode as an octal string"),
        (entry(mode=""), "mode", "expected a file mode as an octal string"),
        (entry(extra="mode = 600"), "mode", "Input should be a valid string"),
        (entry(extra="owner = 'me'"), "owner", "Extra inputs are not permitted"),
        ("[[file_sync]]\nhost = '/etc/hosts'\n", "guest", "Field required"),
    ],
)
def test_each_class_of_bad_entry_is_refused_naming_its_index(tmp_path, bad, where, says):
    with pytest.raises(BangerError) as ei:
        settings(tmp_path, GOOD + bad)
    assert ei.value.message.startswith(f"{tmp_path / 'config.toml'}: file_sync[2].{where}: "), ei.value.message
    assert says in ei.value.message, ei.value.message


def test_tilde_expands_against_home_on_the_host_and_to_root_in_the_guest(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/tester")
    s = settings(tmp_path, entry("~/.aws", "~/.aws") + entry("/srv/tool", "/root/bin/tool", mode="755"))
    assert [(e.host, e.guest, e.mode, e.file_mode) for e in s.file_sync] == [
        ("/home/tester/.aws", "/root/.aws", None, 0o600),  # a file's default mode
        ("/srv/tool", "/root/bin/tool", "755", 0o755),
    ]
    monkeypatch.setenv("HOME", "relative/home")
    with pytest.raises(BangerError, match=r"file_sync\[0\]\.host: Value error, ~ expands to 'relative/home/.aws'"):
        settings(tmp_path, entry("~/.aws", "~/.aws"))


@pytest.mark.parametrize(("mode", "bits"), [("600", 0o600), ("0600", 0o600), ("0755", 0o755), ("0644", 0o644), ("000", 0)])
def test_modes_are_octal_permission_strings(tmp_path, mode, bits):
    assert settings(tmp_path, entry(mode=mode)).file_sync[0].file_mode == bits


def test_the_old_table_and_the_key_inside_a_table_are_refused_saying_what_to_write(tmp_path):
    with pytest.raises(BangerError, match=r"\[filesync\] entries is gone: write each entry as a top-level \[\[file_sync\]\]"):
        settings(tmp_path, "[filesync]\nentries = [{host = '/etc/hosts', guest = '~/h', mode = 'copy'}]\n")
    with pytest.raises(BangerError, match=r"\[filesync\] file_sync: file_sync is a top-level key of its own"):
        settings(tmp_path, "[filesync]\nfile_sync = [{host = '/etc/hosts', guest = '~/h'}]\n")
    with pytest.raises(BangerError, match=r"config.toml: file_sync: Input should be a valid array"):
        settings(tmp_path, "[file_sync]\nhost = '/etc/hosts'\nguest = '~/h'\n")


def test_a_projects_entries_stay_inside_the_project_and_add_to_the_users(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    monkeypatch.setenv("HOME", str(home))
    proj = tmp_path / "proj"
    (proj / "conf").mkdir(parents=True)
    (proj / "conf" / "dev.env").write_text("A=1\n")
    (proj / "keys").symlink_to(home / ".ssh")  # a link inside the project, pointing out of it
    user = entry("~/.ssh/id_ed25519", "~/.ssh/id_ed25519")  # the user's own config may name any path
    s = settings(
        tmp_path, user, entry(f"{proj}/conf/dev.env", "~/dev.env") + entry(str(proj), "~/src") + entry(f"{proj}/new", "~/n")
    )
    assert [e.guest for e in s.file_sync] == ["/root/.ssh/id_ed25519", "/root/dev.env", "/root/src", "/root/n"]
    assert [e.project for e in s.file_sync] == [None] + [str(proj.resolve())] * 3
    for bad, index, shown in [
        (entry("~/.ssh/id_ed25519", "~/k"), 1, f"{home}/.ssh/id_ed25519 is outside it"),
        (entry("/etc/hosts", "~/h"), 1, "/etc/hosts is outside it"),
        (entry(f"{proj}/keys/id_ed25519", "~/k"), 1, f"{proj}/keys/id_ed25519 (which is {home}/.ssh/id_ed25519) is outside it"),
        (entry(f"{proj}/keys", "~/k"), 1, f"(which is {home}/.ssh) is outside it"),
        (entry(str(tmp_path), "~/k"), 1, f"{tmp_path} is outside it"),  # the project's parent
        (entry(f"{proj}-evil/x", "~/k"), 1, f"{proj}-evil/x is outside it"),  # a sibling sharing its prefix
    ]:
        with pytest.raises(BangerError) as ei:
            settings(tmp_path, user, entry(f"{proj}/conf/dev.env", "~/dev.env") + bad)
        msg = ei.value.message
        assert msg.startswith(f"{proj / 'banger.toml'}: file_sync[{index}].host: a project's banger.toml may only copy paths "), (
            msg
        )
        assert f"inside its project {proj.resolve()}: " in msg and shown in msg, msg


def test_doctor_lists_entries_and_warns_about_missing_host_paths(benv, tmp_path):
    (tmp_path / "present").write_text("x")
    benv.write_config(entry(str(tmp_path / "present"), "~/p", mode="0644") + entry(str(tmp_path / "absent"), "~/a"))
    checks = {c["name"]: c for c in json.loads(benv.run("doctor", "--json").stdout)["checks"]}
    got = checks["filesync: entries"]
    assert got["status"] == "WARN" and f"host paths missing (skipped at start): {tmp_path / 'absent'}" in got["detail"]
    assert f"{tmp_path / 'present'} -> /root/p (0644)" in got["detail"]


def test_a_vm_without_an_agent_starts_with_a_warning_and_nothing_copied(fcenv, tmp_path):
    """The fake firecracker's VM (a registered image: no agent launcher) boots no guest:
    no agent answers, so the entries are not copied, and the VM runs."""
    from conftest import fc_create

    (tmp_path / "f").write_text("x")
    fcenv.config_file.write_text(fcenv.config_file.read_text() + entry(str(tmp_path / "f"), "~/f"))
    r = fc_create(fcenv, "noagent")
    assert "warning: filesync: no agent answers in VM noagent" in r.stderr and "1 file_sync entry not copied" in r.stderr
    shown = json.loads(fcenv.run("vm", "show", "noagent", "--json", check=True).stdout)
    assert shown["state"] == "running" and shown["fields"]["filesync"]["failed"] == [f"{tmp_path / 'f'} -> /root/f: no agent"]
    fcenv.run("vm", "delete", "noagent", "--force", check=True)


# --- in real guests ---------------------------------------------------------------------


def busybox_image_layer() -> bytes:
    from test_agent_anyimage import busybox_layer

    return busybox_layer()


@pytest.fixture(scope="module")
def fs(oci_registry, tmp_path_factory):
    """An isolated banger whose $HOME is a directory of the test's, with the user's
    [[file_sync]] entries, a project adding one, and a running VM `fs1` made from it."""
    pushed = push_layers(oci_registry, "banger/fsbox", "1", [busybox_image_layer()], tmp_path_factory.mktemp("fsbox"))
    root = tmp_path_factory.mktemp("fs")
    home, proj = root / "home", root / "proj"
    (home / "bin").mkdir(parents=True)
    (home / "secret.txt").write_text("v1\n")
    (home / "secret.txt").chmod(0o644)  # the entry's default (0600) wins over the host's mode
    (home / "bin" / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    tree = home / ".aws"
    (tree / "sso" / "cache").mkdir(parents=True)
    (tree / "config").write_text("[default]\n")
    (tree / "config").chmod(0o644)
    (tree / "credentials").write_text("key=1\n")
    (tree / "credentials").chmod(0o600)
    (tree / "sso" / "cache" / "token.json").write_text("{}")
    (tree / "sso" / "cache" / "token.json").chmod(0o640)
    (tree / "sso").chmod(0o700)
    (tree / "run.sh").write_text("#!/bin/sh\n")
    (tree / "run.sh").chmod(0o750)
    (tree / "current").symlink_to("sso/cache/token.json")
    (proj / "env").mkdir(parents=True)
    (proj / "env" / "dev.env").write_text("FROM=project\n")
    (proj / "banger.toml").write_text(entry(f"{proj}/env/dev.env", "~/project.env", mode="0640"))
    with isolated_env() as e:
        e.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
        e.extra_env["HOME"] = str(home)
        e.write_config(
            "[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n"
            + entry("~/secret.txt", "~/.config/app/secret.txt")
            + entry("~/bin/tool.sh", "/root/bin/tool.sh", mode="0755")
            + entry("~/.aws", "~/.aws")
            + entry("~/not-there", "~/not-there")
        )
        e.run("kernel", "pull", "microvm-6.1", check=True, timeout=LONG)
        e.run("image", "pull", pushed["ref"], "--name", "fsbox", "--kernel-ref", "microvm-6.1", check=True, timeout=LONG)
        e.home, e.proj, e.base = home, proj, root
        e.created = e.run(*CREATE, "--name", "fs1", "--project", str(proj), check=True, timeout=LONG)
        yield e
        names = [v["name"] for v in json.loads(e.run("vm", "list", "--json", timeout=120).stdout or "[]")]
        if names:
            e.run("vm", "delete", "--force", *names, timeout=300)
        for s in json.loads(e.run("snapshot", "list", "--json", timeout=120).stdout or "[]"):
            e.run("snapshot", "delete", s["name"], timeout=120)


CREATE = ("vm", "create", "--image", "fsbox", "--vcpu", "1", "--memory", "256M")
needs_oci = pytest.mark.skipif(bool(missing_tools()), reason=f"needs {missing_tools()} (scripts/install.sh installs them)")


def sh(env, vm: str, script: str) -> str:
    r = env.run("vm", "exec", vm, "--", "sh", "-c", script, timeout=120)
    assert r.returncode == 0, f"{vm}: {script}: {r.returncode} {r.stderr}"
    return r.stdout


def stats(env, vm: str, *paths: str) -> dict[str, str]:
    """``mode uid gid`` of each guest path (stat -c, busybox's), not following links."""
    out = sh(env, vm, "stat -c '%n %a %u %g' " + " ".join(shlex.quote(p) for p in paths))
    return {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in out.splitlines()}


@pytest.mark.oci
@pytest.mark.slow
@needs_oci
def test_files_and_trees_land_owned_by_root_with_their_modes_and_a_missing_path_warns(fs):
    assert "warning: filesync: " in fs.created.stderr and f"{fs.home}/not-there: no such file or directory" in fs.created.stderr
    assert json.loads(fs.run("vm", "show", "fs1", "--json", check=True).stdout)["state"] == "running"
    got = stats(
        fs,
        "fs1",
        "/root/.config/app/secret.txt",
        "/root/.config/app",
        "/root/bin/tool.sh",
        "/root/.aws",
        "/root/.aws/config",
        "/root/.aws/credentials",
        "/root/.aws/run.sh",
        "/root/.aws/sso",
        "/root/.aws/sso/cache/token.json",
        "/root/project.env",
    )
    assert (
        got
        == {
            "/root/.config/app/secret.txt": "600 0 0",  # the default mode, not the host file's 0644
            "/root/.config/app": "755 0 0",  # parents made as mkdir -p does, owned by root
            "/root/bin/tool.sh": "755 0 0",
            "/root/.aws": f"{oct(os.stat(fs.home / '.aws').st_mode & 0o777)[2:]} 0 0",
            "/root/.aws/config": "644 0 0",  # a directory's files keep their own modes
            "/root/.aws/credentials": "600 0 0",
            "/root/.aws/run.sh": "750 0 0",
            "/root/.aws/sso": "700 0 0",
            "/root/.aws/sso/cache/token.json": "640 0 0",
            "/root/project.env": "640 0 0",  # the project's entry, added to the user's
        }
    )
    assert sh(fs, "fs1", "cat /root/.config/app/secret.txt /root/project.env /root/.aws/current") == "v1\nFROM=project\n{}"
    assert sh(fs, "fs1", "readlink /root/.aws/current; /root/bin/tool.sh") == "sso/cache/token.json\ntool\n"
    assert sh(fs, "fs1", "test -e /root/not-there && echo yes || echo no") == "no\n"
    shown = json.loads(fs.run("vm", "show", "fs1", "--json", check=True).stdout)["fields"]["filesync"]
    assert len(shown["synced"]) == 4 and shown["last"].startswith("at start")
    assert shown["skipped"] == [f"{fs.home}/not-there -> /root/not-there: missing on the host"]


@pytest.mark.oci
@pytest.mark.slow
@needs_oci
def test_every_start_copies_the_current_host_files(fs):
    (fs.home / "secret.txt").write_text("v2\n")
    (fs.home / ".aws" / "config").write_text("[default]\nregion = x\n")
    fs.run("vm", "stop", "fs1", check=True, timeout=300)
    r = fs.run("vm", "start", "fs1", check=True, timeout=LONG)
    assert "not-there: no such file or directory" in r.stderr  # warned again, started again
    assert sh(fs, "fs1", "cat /root/.config/app/secret.txt /root/.aws/config") == "v2\n[default]\nregion = x\n"
    assert stats(fs, "fs1", "/root/.config/app/secret.txt")["/root/.config/app/secret.txt"] == "600 0 0"


@pytest.mark.oci
@pytest.mark.slow
@needs_oci
def test_a_restored_vm_gets_the_current_host_files_not_the_snapshots(fs):
    fs.run("vm", "snapshot", "fs1", "--name", "s1", check=True, timeout=LONG)
    (fs.home / "secret.txt").write_text("v3\n")
    (fs.home / ".aws" / "added").write_text("new\n")
    (fs.proj / "env" / "dev.env").write_text("FROM=project v2\n")
    r = fs.run("vm", "restore", "s1", "--name", "fs2", check=True, timeout=LONG)
    assert "not-there: no such file or directory" in r.stderr
    assert sh(fs, "fs2", "cat /root/.config/app/secret.txt /root/.aws/added /root/project.env") == "v3\nnew\nFROM=project v2\n"
    assert sh(fs, "fs1", "cat /root/.config/app/secret.txt") == "v2\n"  # the source keeps what its start copied
    shown = json.loads(fs.run("vm", "show", "fs2", "--json", check=True).stdout)["fields"]["filesync"]
    assert shown["last"].startswith("at resume")  # vm_resumed copied; post_boot did not copy again
    log = (fs.state_dir / "bangerd.log").read_text()
    assert "VM fs2: file_sync at resume: 4 of 5 entries copied" in log and "VM fs2: file_sync at start" not in log


@pytest.mark.oci
@pytest.mark.slow
@needs_oci
def test_a_project_entry_outside_the_project_is_refused_before_any_vm_exists(fs):
    evil = fs.base / "evil"
    evil.mkdir()
    (evil / "keys").symlink_to(fs.home / ".aws")
    (evil / "banger.toml").write_text(entry("~/secret.txt", "~/s") + entry(f"{evil}/keys/credentials", "~/c"))
    vms_before = sorted(p.name for p in (fs.state_dir / "vms").iterdir())
    r = fs.run(*CREATE, "--name", "evil1", "--project", str(evil), timeout=300)
    assert r.returncode != 0
    assert (
        f"{evil / 'banger.toml'}: file_sync[0].host: a project's banger.toml may only copy paths inside its project" in r.stderr
    )
    assert f"{fs.home}/secret.txt is outside it" in r.stderr
    assert "file_sync[1].host: " in r.stderr and f"(which is {fs.home}/.aws/credentials) is outside it" in r.stderr
    assert "evil1" not in [v["name"] for v in json.loads(fs.run("vm", "list", "--json", check=True).stdout)]
    assert sorted(p.name for p in (fs.state_dir / "vms").iterdir()) == vms_before  # no VM dir either
