"""Hostile and careless input, as a new user meets it: names with a trailing newline,
coerced config and RPC values, the original tool's config keys, the messages and
surfaces that explain defaults and errors, plugin cleanup counted on failure.

No guest boots here: a create that fails in a plugin's hook fails before the VMM runs.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import time

import pytest

from banger_core import PROTOCOL_VERSION
from banger_core.config import LEGACY_KEYS, Config
from banger_core.errors import BangerError, ErrorCode
from banger_core.images import check_name
from banger_core.models import parse_size_mib, validate_vm_name
from banger_core.protocol import OP_ID_RE

ENDINGS = ["\n", "\r", "\0", "\r\n", " "]


def rpc(env, method: str, params: dict, op_id: str = "op-0123456789ab") -> dict:
    """One request over the daemon's socket, the final reply back."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(env.socket))
    s.sendall(json.dumps({"v": PROTOCOL_VERSION, "method": method, "params": params, "op_id": op_id}).encode() + b"\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        lines = data.splitlines()
        if lines and data.endswith(b"\n") and "ok" in json.loads(lines[-1]):
            break
    s.close()
    return json.loads(data.splitlines()[-1])


@pytest.fixture
def daemon(benv):
    benv.run("daemon", "start", check=True)
    return benv


def doctor_line(out: str, check: str) -> str:
    """The line of `banger doctor`'s output for the check named ``check``."""
    return next(ln for ln in out.splitlines() if ln.split()[1:2] == [check])


# --- item 1: every validation pattern is anchored at both ends ----------------------


@pytest.mark.parametrize("ending", ENDINGS)
def test_every_validator_refuses_a_trailing_control_character(ending):
    with pytest.raises(ValueError):
        validate_vm_name("box" + ending)
    with pytest.raises(BangerError):
        check_name("image", "debian" + ending)
    with pytest.raises(BangerError):
        check_name("kernel", "k" + ending)
    assert not OP_ID_RE.fullmatch("op-0123456789ab" + ending)
    assert validate_vm_name("box") == "box" and check_name("image", "debian") == "debian"


@pytest.mark.parametrize(
    "method,params",
    [
        ("vm.create", {"name": "ab\n"}),
        ("vm.create", {"name": "ab\r"}),
        ("vm.create", {"name": "ab\u0000"}),
        ("vm.create", {"name": "box/../evil"}),
        ("vm.create", {"name": "ok", "vcpus": 0}),
        ("vm.create", {"name": "ok", "vcpus": -1}),
        ("vm.create", {"name": "ok", "memory_mib": 0}),
        ("kernel.import", {"name": "k\n", "source": "/tmp"}),
        ("kernel.import", {"name": "../k", "source": "/tmp"}),
        ("image.register", {"name": "img\n", "rootfs": "/tmp/x", "kernel_ref": "k"}),
        ("image.register", {"name": "a/b", "rootfs": "/tmp/x", "kernel_ref": "k"}),
        ("image.pull", {"ref": "x", "name": "img\n"}),
    ],
)
def test_bad_names_and_specs_over_the_rpc_leave_nothing(daemon, method, params):
    reply = rpc(daemon, method, params)
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == "bad_request", reply
    db = daemon.state_dir / "banger.db"
    con = sqlite3.connect(db)
    try:
        assert con.execute("select count(*) from vms").fetchone()[0] == 0
        assert con.execute("select count(*) from images").fetchone()[0] == 0
        assert con.execute("select count(*) from kernels").fetchone()[0] == 0
    finally:
        con.close()
    assert not (daemon.state_dir / "vms").exists() or not list((daemon.state_dir / "vms").iterdir())


def test_an_op_id_with_a_trailing_newline_is_not_adopted(daemon):
    reply = rpc(daemon, "daemon.hello", {}, op_id="op-0123456789ab\n")
    assert reply["ok"] and reply["op_id"] != "op-0123456789ab\n" and OP_ID_RE.fullmatch(reply["op_id"])


def test_cli_refuses_a_name_with_a_newline(benv):
    r = benv.run("vm", "create", "--name", "a\n")
    assert r.returncode == 1 and "invalid VM name 'a\\n'" in r.stderr
    assert (
        not (benv.state_dir / "banger.db").exists()
        or not sqlite3.connect(benv.state_dir / "banger.db").execute("select * from vms").fetchall()
    )


# --- item 5: strict config, project files, plugin settings and RPC params -------------


@pytest.mark.parametrize(
    "text,expect",
    [
        ('[vmm]\nstop_timeout_s = "30"\n', "[vmm] stop_timeout_s: Input should be a valid number (got '30')"),
        ("[vm_defaults]\nvcpus = true\n", "[vm_defaults] vcpus: Input should be a valid integer (got True)"),
        ('[vm_defaults]\nvcpus = "2"\n', "[vm_defaults] vcpus: Input should be a valid integer (got '2')"),
        ("[vm_defaults]\nmemory_mib = true\n", "[vm_defaults] memory_mib: Value error, expected a size"),
        ("[vm_defaults]\nmemory_mib = 1.5\n", "[vm_defaults] memory_mib: Value error, expected a size"),
        ('[vm_defaults]\nroot_size_mib = "8X"\n', "[vm_defaults] root_size_mib: Value error, cannot parse size '8X'"),
        ('[vm_defaults]\nroot_size_mib = "0G"\n', "[vm_defaults] root_size_mib: Value error, size must be at least 1 MiB"),
        ("[daemon]\nlog_level = 1\n", "[daemon] log_level: Input should be 'debug', 'info', 'warning' or 'error'"),
        ('[plugins]\ndisable = "dns"\n', "[plugins] disable: Input should be a valid list"),
        ('[images]\nmax_rootfs_size = "lots"\n', "[images] max_rootfs_size: Value error, cannot parse size 'lots'"),
    ],
)
def test_config_values_are_not_coerced(tmp_path, text, expect):
    p = tmp_path / "config.toml"
    p.write_text(text)
    with pytest.raises(BangerError) as ei:
        Config.load(p)
    assert f"{p}: {expect}" in ei.value.message


def test_sizes_take_mib_integers_and_unit_strings(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text('[vm_defaults]\nmemory_mib = "512M"\nroot_size_mib = "8G"\n[images]\nmax_rootfs_size = 2048\n')
    cfg = Config.load(p).core
    assert (cfg.vm_defaults.memory_mib, cfg.vm_defaults.root_size_mib, cfg.images.max_rootfs_size) == (512, 8192, 2048)
    assert Config.load(tmp_path / "absent.toml").core.images.max_rootfs_size == 64 * 1024
    ok = {"512": 512, "512M": 512, "512m": 512, "2G": 2048, "1GiB": 1024, "1T": 1024 * 1024, "2048K": 2, 7: 7}
    for given, mib in ok.items():
        assert parse_size_mib(given) == mib, given
    for bad in [True, False, 1.5, "1.5G", "-1", "0", "G", "2 G B", "2G\n", "", None, [1]]:
        with pytest.raises(ValueError):
            parse_size_mib(bad)


def test_plugin_settings_are_strict_in_user_and_project_files(benv, tmp_path):
    benv.write_config('[dns]\nport = "42069"\n')
    r = benv.run("doctor")
    assert r.returncode == 1 and "[dns] port: Input should be a valid integer" in r.stdout
    benv.write_config("[dns]\nport = 42069\n")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "banger.toml").write_text("[dns]\nport = true\n")
    r = benv.run("plugins", "resolve", "--project", str(proj))
    assert r.returncode == 1 and f"{proj / 'banger.toml'}: [dns] port: Input should be a valid integer" in r.stderr


def test_rpc_params_are_strict(daemon):
    for params, expect in [
        ({"refs": ["x"], "vcpus": "2"}, "vcpus: Input should be a valid integer"),
        ({"refs": ["x"], "vcpus": True}, "vcpus: Input should be a valid integer"),
        ({"refs": ["x"], "vcpus": 2.0}, "vcpus: Input should be a valid integer"),
        ({"refs": ["x"], "memory_mib": True}, "memory_mib: Value error, expected a size"),
        ({"refs": [5]}, "refs.0: Input should be a valid string"),
    ]:
        reply = rpc(daemon, "vm.set", params)
        assert reply["error"]["code"] == "bad_request" and expect in reply["error"]["message"], (params, reply)
    # valid types get past validation (and then find no such VM)
    reply = rpc(daemon, "vm.set", {"refs": ["x"], "memory_mib": "2G"})
    assert reply["result"]["results"][0]["error"]["code"] == "not_found", reply
    # defaults are validated like given values: no signal given means KILL, not KeyError
    reply = rpc(daemon, "vm.kill", {"refs": ["nope"]})
    assert reply["ok"] and reply["result"]["results"][0]["error"]["code"] == "not_found", reply


def test_doctor_fails_a_catalog_path_that_does_not_exist(benv, tmp_path):
    benv.write_config(f"[catalog]\npath = '{tmp_path / 'missing.json'}'\n")
    r = benv.run("doctor")
    assert r.returncode == 1
    line = doctor_line(r.stdout, "catalog")
    assert line.startswith("FAIL") and "missing.json" in line and "No such file" in line, line
    (tmp_path / "missing.json").write_text('{"version": 1, "kernels": {}, "images": {}}')
    line = doctor_line(benv.run("doctor").stdout, "catalog")
    assert line.startswith("PASS"), line


# --- item 6: the original tool's config keys -------------------------------------------


# where the original tool's users put them: its flat file, or guessing a banger table
# (memory_mib is a real [vm_defaults] key, so only its top-level form is legacy)
LEGACY_CASES = [(k, "top") for k in sorted(LEGACY_KEYS)] + [(k, "vm_defaults") for k in sorted(LEGACY_KEYS) if k != "memory_mib"]


@pytest.mark.parametrize("key,where", LEGACY_CASES)
def test_original_config_keys_say_what_became_of_them(tmp_path, key, where):
    p = tmp_path / "config.toml"
    value = '"2G"' if "size" in key else ("2" if key in ("vcpu", "stats_poll_interval", "memory_mib") else '"x"')
    if where == "top":
        p.write_text(f"{key} = {value}\n")
    else:
        p.write_text(f"[vm_defaults]\n{key} = {value}\n")
    with pytest.raises(BangerError) as ei:
        Config.load(p)
    msg = ei.value.message
    assert ei.value.code is ErrorCode.CONFIG
    assert key in msg and ("renamed to" in msg or "not supported:" in msg), msg
    assert "Extra inputs are not permitted" not in msg and "expected a table" not in msg


def test_original_config_renames_name_the_new_key(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text('vcpu = 2\ndisk_size = "2G"\nfirecracker_bin = "/usr/bin/fc"\n')
    with pytest.raises(BangerError) as ei:
        Config.load(p)
    msg = ei.value.message
    assert f"{p}: vcpu: renamed to [vm_defaults] vcpus" in msg
    assert f"{p}: disk_size: renamed to [workdisk] size_mib" in msg
    assert f"{p}: firecracker_bin: renamed to [vmm] firecracker_binary" in msg


# --- item 7: surfaces that explain defaults and errors ----------------------------------


def test_create_help_and_doctor_show_resolved_defaults_with_provenance(benv):
    from banger_core import host

    benv.write_config('[vm_defaults]\nvcpus = 2\nroot_size_mib = "2G"\n')
    text = " ".join(benv.run("vm", "create", "--help", COLUMNS="200", check=True).stdout.split())
    assert "default: 2 (config)" in text
    assert f"default: {host.default_memory_mib()} MiB (auto: host RAM/8" in text
    assert "default: 2048 MiB (config)" in text
    assert "default: debian-bookworm (builtin)" in text and "[vm_defaults]" not in text
    line = next(ln for ln in benv.run("doctor").stdout.splitlines() if "vm defaults" in ln)
    assert "vcpus=2 (config)" in line and f"memory={host.default_memory_mib()} MiB (auto)" in line
    assert "root_size=2048 MiB (config)" in line and "image=debian-bookworm (builtin)" in line
    assert str(benv.config_file) in line


def test_cli_errors_carry_their_code_but_not_the_generic_one(benv):
    from banger_core.cli.common import error_line

    r = benv.run("vm", "show", "nope")
    assert r.returncode == 1 and r.stderr.startswith("banger: no VM named or with ID prefix 'nope' (not_found, op-")
    r = benv.run("vm", "stop", "nope", "also-nope")
    assert r.stderr.count("(not_found, op-") == 2 and "banger: also-nope: " in r.stderr
    generic = BangerError(ErrorCode.OPERATION_FAILED, "it broke", op_id="op-0123456789ab")
    assert error_line(generic) == "banger: it broke (op-0123456789ab)"
    assert error_line(BangerError(ErrorCode.CONFIG, "bad")) == "banger: bad (config_error)"


# --- item 9: plugin cleanup exactly once per failed create and delete -------------------


@pytest.fixture
def xenv(benv, example_plugin_dir, tmp_path):
    """A daemon with the example plugin, a tiny kernel file and a real (tiny) ext4 image."""
    benv.extra_path.append(str(example_plugin_dir))
    kdir = tmp_path / "kernel"
    kdir.mkdir()
    (kdir / "vmlinuz").write_bytes(b"\0" * 4096)
    rootfs = tmp_path / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(rootfs), "16M"], check=True)
    benv.write_config("[vmm]\naccel = 'tcg'\ndriver = 'qemu'\n")
    benv.run("kernel", "import", "k", "--from", str(kdir), check=True)
    benv.run("image", "register", "tiny", "--rootfs", str(rootfs), "--kernel-ref", "k", check=True)
    return benv


def hooks(record) -> list[str]:
    return [json.loads(ln)["hook"] for ln in record.read_text().splitlines()] if record.exists() else []


def settled(env) -> None:
    """Wait until the daemon has no request in flight (a late second cleanup would
    otherwise go unseen)."""
    from conftest import wait_for

    wait_for(lambda: json.loads(env.run("daemon", "status", "--json", check=True).stdout)["inflight"] == 0, timeout=30)


@pytest.mark.parametrize("stage", ["prepare_host", "configure_machine"])
def test_failed_create_runs_plugin_cleanup_once(xenv, tmp_path, stage):
    record = tmp_path / "calls.jsonl"
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "banger.toml").write_text(f"[example]\nrecord = '{record}'\nfail_in = '{stage}'\n")
    r = xenv.run("vm", "create", "--name", "doomed", "--image", "tiny", "--project", str(proj), timeout=120)
    assert r.returncode == 1 and f"failing in {stage} as configured" in r.stderr, r.stderr
    settled(xenv)
    calls = hooks(record)
    assert calls.count("cleanup") == 1, calls
    assert calls[-1] == "cleanup" and "post_boot" not in calls
    assert json.loads(xenv.run("vm", "list", "--json", check=True).stdout) == []
    assert not (xenv.state_dir / "vms").exists() or not list((xenv.state_dir / "vms").iterdir())


def test_failed_create_before_the_plugins_ran_still_cleans_up_once(xenv, tmp_path):
    """A failure before prepare_host (here: the image's rootfs vanished, so the VM's
    disk cannot be made) runs every plugin's cleanup once: not zero, not twice."""
    record = tmp_path / "calls.jsonl"
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "banger.toml").write_text(f"[example]\nrecord = '{record}'\n")
    (tmp_path / "rootfs.ext4").unlink()
    r = xenv.run("vm", "create", "--name", "doomed", "--image", "tiny", "--project", str(proj), timeout=120)
    assert r.returncode == 1, r.stderr
    settled(xenv)
    assert hooks(record) == ["cleanup"], hooks(record)
    assert json.loads(xenv.run("vm", "list", "--json", check=True).stdout) == []


# --- the catalog file is input too ------------------------------------------------------

GOOD_SHA = "ab" * 32


@pytest.mark.parametrize(
    "catalog,expect",
    [
        (
            # recipes are the debian plugin's now: a catalog names bundles
            {"kernels": {"k": {"recipe": "debian-cloud-kernel", "bundle": {"url": "http://x/k", "sha256": GOOD_SHA}}}},
            "kernels.k.recipe: Extra inputs are not permitted",
        ),
        ({"kernels": {"k": {"description": "no source"}}}, "kernels.k.bundle: Field required"),
        (
            {"kernels": {"k": {"bundle": {"url": "http://x/k", "sha256": "abc"}}}},
            "kernels.k.bundle.sha256: Value error, expected a sha256 hex digest",
        ),
        (
            {"kernels": {"k": {"bundle": {"url": "http://x/k", "sha256": GOOD_SHA + "\n"}}}},
            "kernels.k.bundle.sha256: Value error, expected a sha256 hex digest",
        ),
        (
            {"kernels": {"k": {"bundle": {"url": "ftp://x/k", "sha256": GOOD_SHA}}}},
            "kernels.k.bundle.url: Value error, expected an http(s):// or file:// URL",
        ),
        (
            {"kernels": {"k": {"bundle": {"url": "http://x/k", "sha256": GOOD_SHA, "size": "12"}}}},
            "kernels.k.bundle.size: Input should be a valid integer",
        ),
        ({"images": {"i": {"bundle": {"url": "http://x/i", "sha256": GOOD_SHA}}}}, "images.i.kernel_ref: Field required"),
        (
            {"images": {"i": {"bundle": {"url": "http://x/i", "sha256": GOOD_SHA}, "kernel_ref": "k", "colour": "red"}}},
            "images.i.colour: Extra inputs are not permitted",
        ),
        ({"kernels": {"bad\n": {"bundle": {"url": "http://x/k", "sha256": GOOD_SHA}}}}, "invalid kernel name 'bad\\n'"),
        ({"version": 2}, "version: Input should be 1"),
        ([1, 2], "Input should be an object"),
    ],
)
def test_a_bad_catalog_file_is_a_config_error_naming_the_entry(benv, tmp_path, catalog, expect):
    cat = tmp_path / "catalog.json"
    cat.write_text(json.dumps(catalog))
    benv.write_config(f"[catalog]\npath = '{cat}'\n")
    r = benv.run("doctor")
    line = doctor_line(r.stdout, "catalog")
    assert r.returncode == 1 and line.startswith("FAIL") and f"[catalog] path {cat}: " in line, line
    assert expect in line, line
    r = benv.run("image", "pull", "anything")
    assert r.returncode == 1 and expect in r.stderr and "(config_error" in r.stderr, r.stderr


def test_catalog_entries_need_no_description(benv, tmp_path):
    cat = tmp_path / "catalog.json"
    cat.write_text(json.dumps({"kernels": {"plain": {"bundle": {"url": "http://127.0.0.1:9/k", "sha256": GOOD_SHA}}}}))
    benv.write_config(f"[catalog]\npath = '{cat}'\n")
    r = benv.run("kernel", "list", "--available", check=True)
    assert "plain" in r.stdout and "available" in r.stdout


# --- a stopped daemon exits; the next one removes what cut-off operations left ---------


def test_a_stopped_daemon_exits_though_an_operation_ignores_cancellation(benv, example_plugin_dir, tmp_path):
    """A blocking operation that ignores cancellation used to keep a stopped daemon
    alive for as long as it ran (interpreter exit joins worker threads)."""
    from banger_core.daemon.server import WORKER_GRACE
    from conftest import pid_alive, wait_for

    benv.extra_path.append(str(example_plugin_dir))
    benv.run("daemon", "start", check=True)
    pid = benv.daemon_pid()
    marker = tmp_path / "marker"
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(benv.socket))
    s.sendall(
        json.dumps(
            {"v": PROTOCOL_VERSION, "method": "example.stuck", "params": {"marker": str(marker)}, "op_id": "op-0123456789ab"}
        ).encode()
        + b"\n"
    )
    wait_for(lambda: marker.exists(), timeout=20)
    s.close()  # the client goes: the request is cancelled, its thread sleeps on
    t0 = time.monotonic()
    assert rpc(benv, "daemon.shutdown", {})["ok"]
    wait_for(lambda: not pid_alive(pid), timeout=WORKER_GRACE + 20, interval=0.1)
    took = time.monotonic() - t0
    assert WORKER_GRACE - 1 < took < WORKER_GRACE + 15, took
    log = (benv.state_dir / "bangerd.log").read_text()
    assert "exiting with 1 operation(s) still running" in log
    assert not benv.socket.exists() and not (benv.runtime_dir / "bangerd.pid").exists()
    assert "not running" in benv.run("daemon", "status", check=True).stdout


def test_the_next_daemon_removes_what_cut_off_operations_left(benv):
    st = benv.state_dir
    leftovers = [
        st / "images" / ".img.staging-abc123" / "rootfs.ext4",
        st / "images" / "img" / ".rootfs.ext4.tmp",
        st / "kernels" / ".k.staging-x1y2" / "vmlinuz",
        benv.root / "cache" / "bundles" / "image-img" / "rootfs.ext4",
        benv.root / "cache" / "bundles" / ".image-img.staging-zz" / "bundle.tar.zst",
        benv.root / "cache" / "scratch" / ".oci-img.staging-q1" / "tree" / "etc" / "os-release",
    ]
    for f in leftovers:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    kept = st / "images" / "img" / "rootfs.ext4"
    kept.write_bytes(b"published")
    # a kernel replacement cut off after "old aside", before "new in": the old one is restored
    (st / "kernels" / ".k2.old").mkdir(parents=True)
    (st / "kernels" / ".k2.old" / "vmlinuz").write_bytes(b"k2")
    # ... and one cut off after "new in": the old one goes
    (st / "kernels" / "k3").mkdir()
    (st / "kernels" / ".k3.old").mkdir()
    benv.run("daemon", "start", check=True)
    for f in leftovers:
        assert not f.exists(), f
    assert not (st / "images" / ".img.staging-abc123").exists() and not (st / "kernels" / ".k.staging-x1y2").exists()
    assert list((benv.root / "cache" / "bundles").iterdir()) == []
    assert list((benv.root / "cache" / "scratch").iterdir()) == []
    assert kept.read_bytes() == b"published"
    assert (st / "kernels" / "k2" / "vmlinuz").read_bytes() == b"k2" and not (st / "kernels" / ".k2.old").exists()
    assert (st / "kernels" / "k3").is_dir() and not (st / "kernels" / ".k3.old").exists()
    log = (st / "bangerd.log").read_text()
    assert log.count("left by an operation the previous daemon did not finish") == 7, log


def test_an_ordinary_stop_waits_for_no_idle_worker(benv):
    """Idle pool threads are not operations: a daemon that served requests stops
    without waiting out the grace period for them (each stop took 10 s when it did)."""
    benv.run("daemon", "start", check=True)
    for _ in range(3):
        benv.run("vm", "list", check=True)
        benv.run("kernel", "list", check=True)
    benv.run("daemon", "stop", check=True)
    log = (benv.state_dir / "bangerd.log").read_text()
    assert "still running" not in log and "shutting down" in log
