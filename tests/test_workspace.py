"""The workspace plugin: a host git repository in the guest's /root/repo, and every
change back as a patch that applies.

Unit: what a prepare sends (tracked files with their working-tree content, untracked
ones only when asked, submodules only in full_copy), refusals as a class. Through the
daemon and CLI on the default image (it has git), as a new user would: vm run PATH
(-d, then --rm warm runs), the export round trip with --base-commit reproducing the
guest's tree exactly on a clean host checkout (guest commit, uncommitted edit, new
untracked and binary files) while a plain export leaves the commit out, the guest's
staged set untouched and /tmp a 1 MiB tmpfs; vm exec in /root/repo, the dirty-host
warning, --auto-prepare refusing over unexported changes unless --force; the workspace
intact after stop/start and after a restore from a snapshot; .mise.toml without egress
refused before any VM exists, --no-bootstrap passing, an image without mise named
(egress from the example plugin's vm_egress: tests have no way out).

Boots: ws (a boot, then a start after a stop); restores: the --rm runs (warm), ws-r.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

import guest_assets as ga
from banger_workspace import repo

LONG = 1800


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def make_repo(where: Path) -> Path:
    r = where / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "tracked.txt").write_text("tracked\n")
    (r / "sub").mkdir()
    (r / "sub" / "s.txt").write_text("s\n")
    (r / "gone.txt").write_text("to be deleted on the host\n")
    (r / "bin.dat").write_bytes(bytes(range(256)))
    (r / ".gitignore").write_text("*.log\n")
    git(r, "add", ".")
    git(r, "commit", "-qm", "init")
    (r / "tracked.txt").write_text("tracked\nhost edit\n")  # uncommitted host edit
    (r / "gone.txt").unlink()
    (r / ".env").write_text("SECRET=1\n")  # untracked
    (r / "build.log").write_text("ignored\n")
    return r


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


# --- unit: what a prepare sends ---------------------------------------------------------


def test_inspect_sends_tracked_working_tree_content_and_untracked_only_when_asked(tmp_path):
    r = make_repo(tmp_path)
    plan = repo.inspect(str(r))
    assert sorted(plan.files) == [".gitignore", "bin.dat", "sub/s.txt", "tracked.txt"]
    assert sorted(plan.dirty) == ["gone.txt", "tracked.txt"] and plan.untracked == [".env"]
    assert plan.branch == "main" and plan.head == git(r, "rev-parse", "HEAD").strip() and plan.subdir == ""
    plan = repo.inspect(str(r / "sub"), include_untracked=True)
    assert ".env" in plan.files and "build.log" not in plan.files and plan.subdir == "sub"
    # a submodule: left out in copy mode (named), its files sent in full_copy
    lib = tmp_path / "lib"
    lib.mkdir()
    git(lib, "init", "-q")
    (lib / "l.txt").write_text("l\n")
    git(lib, "add", ".")
    git(lib, "commit", "-qm", "l")
    git(r, "-c", "protocol.file.allow=always", "submodule", "-q", "add", str(lib), "lib")
    git(r, "commit", "-qm", "sub")
    assert repo.inspect(str(r)).submodules == ["lib"]
    full = repo.inspect(str(r), mode="full_copy")
    assert "lib/l.txt" in full.files and "lib/.git" in full.files and full.submodules == []


@pytest.mark.parametrize(
    "setup, mode, message",
    [
        ("plain", "copy", "is not in a git repository"),
        ("empty", "copy", "has no commit yet"),
        ("repo", "shallow", "mode 'shallow': use copy or full_copy"),
        ("missing", "copy", "not a directory"),
    ],
)
def test_inspect_refuses_what_it_cannot_send(tmp_path, setup, mode, message):
    d = tmp_path / "d"
    if setup != "missing":
        d.mkdir()
    if setup == "empty":
        git(d, "init", "-q")
    if setup == "repo":
        d = make_repo(tmp_path)
    with pytest.raises(repo.RepoError, match=message):
        repo.inspect(str(d), mode=mode)


def test_shallow_git_dir_holds_head_alone_on_the_hosts_branch(tmp_path):
    r = make_repo(tmp_path)
    git(r, "commit", "-qam", "second")
    plan = repo.inspect(str(r))
    gd = repo.shallow_git_dir(plan, str(tmp_path))
    env_git = ["git", "--git-dir", gd]
    assert subprocess.run([*env_git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() == plan.head
    assert subprocess.run([*env_git, "symbolic-ref", "HEAD"], capture_output=True, text=True).stdout.strip() == "refs/heads/main"
    log = subprocess.run([*env_git, "log", "--format=%H"], capture_output=True, text=True).stdout.split()
    assert log == [plan.head]  # shallow: the parent is not there


# --- through the daemon and CLI -----------------------------------------------------------


@pytest.fixture(scope="module")
def wsenv(tmp_path_factory, example_plugin_dir):
    from conftest import isolated_env

    with isolated_env() as env:
        # the example plugin says a VM with --motto egress reaches beyond this host
        # (vm_egress): egress without a network namespace of the test's own
        env.extra_path.append(str(example_plugin_dir))
        env.extra_env["BANGER_CACHE_DIR"] = str(ga.default_cache_dir() / "banger-cache")
        env.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 30\n")
        env.repo = make_repo(tmp_path_factory.mktemp("ws"))
        yield env


def vms(env) -> list:
    return json.loads(env.run("vm", "list", "--json", check=True).stdout)


@pytest.mark.slow
def test_vm_run_path_prepares_the_workspace_and_export_round_trips(wsenv, tmp_path):
    env, r = wsenv, wsenv.repo
    spec = ["--vcpu", "1", "--memory", "1G"]
    # --dry-run: what would go, and no VM
    d = env.run("vm", "run", "--dry-run", str(r), "--", "true", check=True)
    assert "would copy " in d.stderr and "1 untracked file(s) left out" in d.stderr and vms(env) == []
    made = env.run("vm", "run", "-d", "--name", "ws", *spec, str(r), check=True, timeout=LONG)
    assert "uncommitted host edit(s) arrive as uncommitted edits: gone.txt, tracked.txt" in made.stderr, made.stderr
    head = git(r, "rev-parse", "HEAD").strip()
    show = json.loads(env.run("vm", "show", "ws", "--json", check=True).stdout)
    assert show["fields"]["workspace"]["head"] == head and show["fields"]["workspace"]["path"] == "/root/repo"
    # vm exec runs in /root/repo; the host's edits are uncommitted edits there; no .env
    out = env.run("vm", "exec", "ws", "--", "sh", "-c", "pwd; git status --short; ls -a", check=True, timeout=300).stdout
    lines = out.splitlines()
    assert lines[0] == "/root/repo" and " M tracked.txt" in lines and " D gone.txt" in lines and ".env" not in lines
    # the guest works: a commit, an uncommitted edit, a new untracked file, a new binary file
    work = (
        "set -e; echo committed >> sub/s.txt; git -c user.email=g@g -c user.name=g commit -qam guest; "
        "echo uncommitted >> tracked.txt; echo new > new.txt; head -c 4096 /dev/urandom > blob.bin; "
        "git add new.txt; git diff --cached --name-only; mount -t tmpfs -o size=1m tmpfs /tmp"
    )
    staged_before = env.run("vm", "exec", "ws", "--", "sh", "-c", work, check=True, timeout=300).stdout
    assert staged_before.split() == ["new.txt"]
    patch = tmp_path / "all.patch"
    e = env.run("vm", "workspace", "export", "ws", "--base-commit", head, "-o", str(patch), check=True, timeout=300)
    assert "4 file(s) changed" in e.stderr or "5 file(s) changed" in e.stderr, e.stderr
    clean = tmp_path / "clean"
    subprocess.run(["git", "clone", "-q", str(r), str(clean)], check=True)
    subprocess.run(["git", "apply", "--binary", str(patch)], cwd=clean, check=True)
    dump = "cd /root/repo && find . -type f ! -path './.git/*' -exec sha256sum {} + | sort -k2"
    guest = env.run("vm", "exec", "ws", "--", "sh", "-c", dump, check=True, timeout=300).stdout
    guest_tree = {line.split()[1][2:]: line.split()[0] for line in guest.splitlines()}
    assert tree_digest(clean) == guest_tree  # the guest's tree, exactly
    # a plain export (against the guest's HEAD) leaves the commit's content out
    plain = env.run("vm", "workspace", "export", "ws", check=True, timeout=300).stdout
    assert "+committed" not in plain and "+uncommitted" in plain and "new.txt" in plain
    staged_after = env.run("vm", "exec", "ws", "--", "git", "diff", "--cached", "--name-only", check=True).stdout
    assert staged_after == staged_before  # the guest's index untouched
    # the host changes: a warning; --auto-prepare refuses over unexported changes...
    (r / "tracked.txt").write_text("tracked\nhost edit\nmore\n")
    w = env.run("vm", "exec", "ws", "--", "true", check=True)
    assert "changed on the host since it was prepared" in w.stderr, w.stderr
    env.run("vm", "exec", "ws", "--", "sh", "-c", "echo later >> tracked.txt", check=True)
    a = env.run("vm", "exec", "--auto-prepare", "ws", "--", "true", timeout=300)
    assert a.returncode == 1 and "holds changes not exported yet" in a.stderr, a.stderr
    # ...and with --force copies the host's state in again
    a = env.run("vm", "exec", "--auto-prepare", "--force", "ws", "--", "cat", "tracked.txt", check=True, timeout=300)
    assert a.stdout == "tracked\nhost edit\nmore\n"
    assert "changed on the host" not in env.run("vm", "exec", "ws", "--", "true", check=True).stderr


@pytest.mark.slow
def test_workspace_survives_stop_start_and_a_restore(wsenv):
    env = wsenv
    env.run("vm", "exec", "ws", "--", "sh", "-c", "echo kept > marker.txt", check=True)
    env.run("vm", "stop", "ws", check=True, timeout=300)
    env.run("vm", "start", "ws", check=True, timeout=LONG)
    assert env.run("vm", "exec", "ws", "--", "cat", "marker.txt", check=True, timeout=300).stdout == "kept\n"
    env.run("vm", "snapshot", "ws", "--name", "ws-snap", check=True, timeout=LONG)
    env.run("vm", "restore", "ws-snap", "--name", "ws-r", check=True, timeout=LONG)
    r = env.run("vm", "exec", "ws-r", "--", "sh", "-c", "pwd; cat marker.txt", check=True, timeout=300)
    assert r.stdout == "/root/repo\nkept\n"
    show = json.loads(env.run("vm", "show", "ws-r", "--json", check=True).stdout)
    assert show["fields"]["workspace"]["from"] == str(env.repo.resolve())
    for name in ("ws-r", "ws"):
        env.run("vm", "delete", name, "--force", check=True, timeout=300)
    env.run("snapshot", "delete", "ws-snap", check=True, timeout=300)


@pytest.mark.slow
def test_vm_run_path_untracked_only_when_asked_and_bootstrap_needs_egress(wsenv):
    env, r = wsenv, wsenv.repo
    spec = ["--vcpu", "1", "--memory", "1G"]
    out = env.run("vm", "run", "--rm", *spec, str(r), "--", "cat", "/root/repo/tracked.txt", check=True, timeout=LONG)
    assert out.stdout.startswith("tracked\n")
    no = env.run("vm", "run", "--rm", *spec, str(r), "--", "cat", "/root/repo/.env", timeout=LONG)
    assert no.returncode != 0
    yes = env.run("vm", "run", "--rm", "--include-untracked", *spec, str(r), "--", "cat", "/root/repo/.env", timeout=LONG)
    assert yes.returncode == 0 and yes.stdout == "SECRET=1\n", yes.stderr
    # a declared toolchain needs egress: refused before any VM exists
    (r / ".mise.toml").write_text("[tools]\n")
    git(r, "add", ".mise.toml")
    git(r, "commit", "-qm", "mise")
    refused = env.run("vm", "run", "--rm", "--network", "none", *spec, str(r), "--", "true", timeout=LONG)
    assert refused.returncode == 1 and "needs network egress" in refused.stderr and "--no-bootstrap" in refused.stderr
    assert vms(env) == []
    ok = env.run("vm", "run", "--rm", "--network", "none", "--no-bootstrap", *spec, str(r), "--", "true", timeout=LONG)
    assert ok.returncode == 0, ok.stderr
    # with egress, on an image without mise: the run says what is missing, and --rm leaves nothing
    plan = env.run("vm", "run", "--dry-run", "--network", "none", "--motto", "egress", str(r), "--", "true", check=True)
    assert "(egress: True)" in plan.stderr and "would copy" in plan.stderr
    nomise = env.run("vm", "run", "--rm", "--network", "none", "--motto", "egress", *spec, str(r), "--", "true", timeout=LONG)
    assert nomise.returncode == 1 and "has no mise to install it" in nomise.stderr, nomise.stderr
    assert vms(env) == []
