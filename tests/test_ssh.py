"""The ssh plugin: ~/.ssh/config's Include (in and out byte for byte), banger's key and
known_hosts, the guest's ssh_setup op, and `vm ssh` / `ssh NAME.vm` against a real
sshd in the default image (mode none: through the agent channel; no network needed).

Boots: two VMs of the default image, one after the other, under one name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import guest_assets as ga
from banger_guest import identity
from banger_ssh import keys, sshconfig

INCLUDE = Path("/state/ssh/config")
HOST_FIRST = "Host work\n    HostName 192.0.2.7\n    User me\n\nHost *\n    ServerAliveInterval 30\n"


def _ssh_g(config: Path, host: str) -> dict[str, str]:
    """What OpenSSH makes of ``config`` for ``host`` (ssh -G: no connection)."""
    out = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True, text=True, check=True).stdout
    return {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in out.splitlines() if " " in ln}


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client (scripts/install.sh installs it)")
def test_include_goes_before_the_first_host_block_and_comes_out_byte_for_byte(tmp_path):
    cfg, record, include = tmp_path / ".ssh" / "config", tmp_path / "installed.json", tmp_path / "banger-ssh"
    include.write_text(sshconfig.render(tmp_path / "id", tmp_path / "known_hosts", "/usr/bin/banger"))
    cfg.parent.mkdir()
    cfg.write_text(HOST_FIRST)
    os.chmod(cfg, 0o640)
    assert sshconfig.install(cfg, include, record) == "installed"
    assert sshconfig.install(cfg, include, record) == "already installed"
    text = cfg.read_text()
    assert text.count("Include") == 1 and text.index("Include") < text.index("Host work")
    assert cfg.stat().st_mode & 0o777 == 0o640  # the user's mode kept
    vm = _ssh_g(cfg, "web.vm")  # it takes effect for *.vm, and only there
    assert vm["user"] == "root" and vm["stricthostkeychecking"] == "true" and "ssh-proxy" in vm["proxycommand"]
    assert vm["userknownhostsfile"] == str(tmp_path / "known_hosts")
    assert _ssh_g(cfg, "work")["user"] == "me" and "proxycommand" not in _ssh_g(cfg, "work")
    assert sshconfig.uninstall(cfg, include, record) == "uninstalled"
    assert cfg.read_bytes() == HOST_FIRST.encode()
    assert sshconfig.uninstall(cfg, include, record) == "not installed"


@pytest.mark.parametrize(
    "original",
    [
        None,  # no file: made 0600, and gone again
        b"",
        b"ServerAliveInterval 30",  # no trailing newline, no Host line: at the end
        b"# mine\n  match host x\n    User y\n",  # an indented Match line, lowercase
        b"Compression yes\nHost=a\n  User b\n",  # Host=NAME
    ],
)
def test_install_and_uninstall_keep_the_users_file(tmp_path, original):
    cfg, record, include = tmp_path / ".ssh" / "config", tmp_path / "installed.json", tmp_path / "banger ssh" / "config"
    if original is not None:
        cfg.parent.mkdir()
        cfg.write_bytes(original)
    sshconfig.install(cfg, include, record)
    text = cfg.read_text()
    assert f'Include "{include}"' in text
    if original is None:
        assert cfg.stat().st_mode & 0o777 == 0o600
    lines = text.splitlines()
    first_block = next((i for i, ln in enumerate(lines) if sshconfig.HOST_OR_MATCH.match(ln)), len(lines))
    assert lines.index(f'Include "{include}"') < first_block
    sshconfig.uninstall(cfg, include, record)
    assert (cfg.read_bytes() if cfg.exists() else None) == original


def test_key_made_once_rotated_and_known_hosts_pinned_per_name(tmp_path):
    key = tmp_path / "ssh" / "id_ed25519"
    first = keys.ensure_key(key)
    assert first.startswith("ssh-ed25519 ") and keys.ensure_key(key) == first
    assert key.stat().st_mode & 0o777 == 0o600
    rotated = keys.rotate_key(key)
    assert rotated != first and keys.public_line(key) == rotated
    kh = tmp_path / "ssh" / "known_hosts"
    keys.pin(kh, "web", "ssh-ed25519 AAAAone root@web")
    keys.pin(kh, "db", "ssh-ed25519 AAAAtwo root@db")
    keys.pin(kh, "web", "ssh-ed25519 AAAAthree root@web")  # a new VM under the old name: its key replaces the old one
    assert kh.read_text() == "db.vm ssh-ed25519 AAAAtwo\nweb.vm ssh-ed25519 AAAAthree\n"
    assert keys.unpin(kh, "web") and not keys.unpin(kh, "web")
    assert kh.read_text() == "db.vm ssh-ed25519 AAAAtwo\n"


def test_ssh_setup_places_keys_and_refuses_bad_fields_whole(tmp_path):
    key = tmp_path / "hk"
    keys.keygen(key, "root@x")
    etc = tmp_path / "root" / "etc" / "ssh"
    etc.mkdir(parents=True)
    (etc / "ssh_host_rsa_key").write_text("old")
    (etc / "ssh_host_rsa_key.pub").write_text("old")
    root = str(tmp_path / "root")
    pair = {"ed25519": {"private": key.read_text(), "public": keys.public_line(key)}}
    mine = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIbanger banger"
    for bad_keys, bad_auth in [
        ({"rsa": {}}, []),
        (pair, ["not a key"]),
        (pair, "ssh-ed25519 AAAA"),
        (pair, ["ssh-ed25519 AAAA\nx"]),
    ]:
        with pytest.raises(identity.BadRequest, match="ssh_setup: bad"):
            identity.ssh_setup(root, bad_keys, bad_auth)
    assert sorted(os.listdir(etc)) == ["ssh_host_rsa_key", "ssh_host_rsa_key.pub"]  # nothing written
    auth = tmp_path / "root" / "root" / ".ssh" / "authorized_keys"
    auth.parent.mkdir(parents=True)
    auth.write_text("ssh-rsa AAAAuser me@laptop\n")
    out = identity.ssh_setup(root, pair, [mine])
    assert out == {"host_keys": True, "authorized_keys": 1, "revoked": 0, "sshd": None}
    assert sorted(os.listdir(etc)) == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    assert (etc / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert identity.ssh_setup(root, None, [mine])["authorized_keys"] == 0  # once
    assert auth.read_text() == f"ssh-rsa AAAAuser me@laptop\n{mine}\n" and auth.stat().st_mode & 0o777 == 0o600
    # a rotation: the new key in, the old one out (matched without its comment), the user's kept
    new = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAInew banger"
    with pytest.raises(identity.BadRequest, match="revoke"):
        identity.ssh_setup(root, None, [new], ["not a key"])
    assert auth.read_text() == f"ssh-rsa AAAAuser me@laptop\n{mine}\n"  # nothing written
    out = identity.ssh_setup(root, None, [new], [mine.rsplit(" ", 1)[0] + " other-comment"])
    assert (out["authorized_keys"], out["revoked"]) == (1, 1)
    assert auth.read_text() == f"ssh-rsa AAAAuser me@laptop\n{new}\n"
    assert identity.ssh_setup(root, None, [new], [new])["revoked"] == 0  # never the key it must hold
    # an image without /etc/ssh (no sshd): no host keys written, authorized_keys still
    bare = tmp_path / "bare"
    out = identity.ssh_setup(str(bare), pair, [new])
    assert out["host_keys"] is False and "no sshd" in out["skipped"]["host_keys"] and not (bare / "etc").exists()
    assert (bare / "root" / ".ssh" / "authorized_keys").read_text() == f"{new}\n"


# --- a real sshd ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshenv():
    from conftest import isolated_env

    with isolated_env() as env:
        env.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
        env.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 30\n[ssh]\nwait_s = 300\n")
        home = env.root / "home"
        home.mkdir()
        env.extra_env["HOME"] = str(home)  # ssh-config --install writes $HOME/.ssh/config, never the real one
        yield env


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client (scripts/install.sh installs it)")
def test_vm_ssh_and_ssh_name_vm_with_a_pinned_key_that_a_new_vm_of_the_name_replaces(sshenv):
    env = sshenv
    spec = ["--vcpu", "1", "--memory", "1G"]
    env.run("vm", "create", "--name", "s1", *spec, check=True, timeout=1800)
    r = env.run("vm", "ssh", "s1", "--", "sh", "-c", "exit 42", timeout=600)
    assert r.returncode == 42, r.stdout + r.stderr
    r = env.run("vm", "ssh", "s1", "--", "printf", "%s|", "a b", "c'd", "$HOME", "", timeout=120)
    assert r.returncode == 0 and r.stdout == "a b|c'd|$HOME||", r.stdout + r.stderr
    # interactive, on a terminal of the test's own: a shell, then the reminder
    from conftest import BANGER
    from test_agent_tools import Pty

    term = Pty(env, [BANGER, "vm", "ssh", "s1"])
    try:
        term.expect(b"# ", timeout=120, poke=b"\r")
        term.send(b"echo in-$((6*7))\r")
        term.expect(b"in-42")
        term.send(b"exit\r")
        term.expect(b"VM s1 is still running (banger vm stop s1 to stop it)")
        assert term.wait() == 0
    finally:
        term.close()
    kh = env.state_dir / "ssh" / "known_hosts"
    first = kh.read_text()
    assert first.startswith("s1.vm ssh-ed25519 ")
    # plain ssh NAME.vm, through ~/.ssh/config's Include (ssh reads the passwd home: -F names ours)
    home = Path(env.extra_env["HOME"])
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "config").write_text(HOST_FIRST)
    for _ in range(2):
        assert env.run("ssh-config", "--install", check=True).returncode == 0
    ssh = ["ssh", "-F", str(home / ".ssh" / "config"), "-o", "BatchMode=yes"]
    r = subprocess.run([*ssh, "s1.vm", "hostname"], env=env.env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "s1" and r.stderr == "", r.stdout + r.stderr
    # the VM goes, a new one takes its name: its own host key, pinned anew, no warning
    env.run("vm", "delete", "s1", "--force", check=True, timeout=300)
    assert "s1.vm" not in kh.read_text()
    new_key = json.loads(env.run("ssh-key", "--rotate", "--json", check=True).stdout)["public"]
    env.run("vm", "create", "--name", "s1", *spec, check=True, timeout=1800)
    env.run("vm", "ssh", "s1", "--", "true", check=True, timeout=600)  # waits for sshd; the new key is accepted
    r = env.run("vm", "ssh", "s1", "--", "cat", "/root/.ssh/authorized_keys", check=True, timeout=120)
    assert r.stdout.splitlines() == [new_key]
    assert kh.read_text().startswith("s1.vm ssh-ed25519 ") and kh.read_text() != first
    r = subprocess.run([*ssh, "s1.vm", "true"], env=env.env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    show = json.loads(env.run("vm", "show", "s1", "--json", check=True).stdout)
    assert show["fields"]["ssh"] == {"host": "s1.vm", "command": "banger vm ssh s1"}
    env.run("ssh-config", "--uninstall", check=True)
    assert (home / ".ssh" / "config").read_text() == HOST_FIRST
    env.run("vm", "delete", "s1", "--force", check=True, timeout=300)
