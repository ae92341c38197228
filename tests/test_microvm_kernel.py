"""banger's microVM kernel: Debian's linux-source-6.1 configured with banger's own
fragment (allnoconfig + KCONFIG_ALLCONFIG), compiled into an ELF vmlinux, pulled
through the catalog as `microvm-6.1` and booted under QEMU -M microvm.

The source package is downloaded once per host into the test cache; the compiled
kernel is cached there too (the same BANGER_CACHE_DIR test_default_image uses), so
only the first run on a machine compiles it (~4-10 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import guest_assets as ga
from banger_debian import microvm_kernel as mk
from banger_debian.common import download_deb
from conftest import BANGER, wait_for

CACHE = ga.default_cache_dir() / "banger-cache"
BUILD_TIMEOUT = 3600


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    deb = download_deb(mk.SOURCE_PACKAGE, None, CACHE / "debs", quiet)
    return mk.unpack_source(deb, tmp_path_factory.mktemp("linux-src"), quiet)


def test_fragment_survives_kconfig(source_tree, tmp_path):
    resolved = mk.configure(source_tree, tmp_path / "frag.config", quiet)
    wanted = mk.parse_config(mk.fragment_text())
    assert len(wanted) > 100
    assert {k: resolved.get(k, "n") for k in wanted} == wanted
    # what the recipe promises, spelled out
    for opt in (
        "PVH",
        "ACPI",
        "VIRTIO_MMIO",
        "VIRTIO_MMIO_CMDLINE_DEVICES",
        "VIRTIO_PCI",
        "VIRTIO_BLK",
        "VIRTIO_NET",
        "VIRTIO_CONSOLE",
        "VIRTIO_VSOCKETS",
        "EXT4_FS",
        "IP_PNP",
        "SERIAL_8250_CONSOLE",
        "DEVTMPFS_MOUNT",
        "CGROUPS",
        "SECCOMP",
    ):
        assert resolved.get(f"CONFIG_{opt}") == "y", opt
    assert resolved.get("CONFIG_MODULES", "n") == "n"  # everything built in: no initrd needed


def test_an_option_kconfig_drops_fails_by_name(source_tree, tmp_path):
    """A fragment line whose dependencies are unmet must not vanish silently."""
    broken = mk.fragment_text() + "\n# PCI off: VIRTIO_PCI can no longer be built\nCONFIG_PCI=n\n"
    with pytest.raises(
        mk.ArtifactBuildError,
        match=r"dropped options of banger's fragment: CONFIG_PCI_MSI=y \(got n\), CONFIG_VIRTIO_PCI=y \(got n\)$",
    ):
        mk.configure(source_tree, tmp_path / "frag.config", quiet, text=broken)


def test_missing_build_tools_are_named_with_their_packages(monkeypatch):
    monkeypatch.setattr(mk, "BUILD_TOOLS", {**mk.BUILD_TOOLS, "no-such-tool-xyz": "some-package"})
    monkeypatch.setattr(mk, "LIBELF_HEADER", Path("/nonexistent/gelf.h"))
    with pytest.raises(
        mk.ArtifactBuildError,
        match=r"needs libelf-dev, some-package \(apt install libelf-dev some-package\)|needs some-package, libelf-dev",
    ):
        mk.check_build_tools()


@pytest.fixture
def kenv(benv):
    benv.extra_env["BANGER_CACHE_DIR"] = str(CACHE)
    benv.write_config("[vmm]\naccel = 'tcg'\nstop_timeout_s = 60\n")
    return benv


def processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is inside ``directory`` (make, gcc, cc1...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(f"{directory}/"):
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_cancelled_build_stops_the_compiler_and_leaves_nothing(benv, tmp_path):
    """Ctrl-C on `kernel pull` (the client goes away) stops make and every compiler,
    removes the unpacked tree and records nothing."""
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    deb = download_deb(mk.SOURCE_PACKAGE, None, CACHE / "debs", quiet)
    (cache / "debs" / deb.name).symlink_to(deb)  # no second download
    benv.extra_env["BANGER_CACHE_DIR"] = str(cache)
    # SIGINT restored to its default: a runner started in the background ignores it
    p = subprocess.Popen(
        [BANGER, "kernel", "pull", "microvm-6.1"],
        env=benv.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = ""
    deadline = time.monotonic() + 300
    assert p.stdout is not None
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        seen += line
        if "compiling vmlinux" in line or not line:
            break
    assert "compiling vmlinux" in seen, seen
    build = cache / "builds" / "kernel-microvm-6.1"
    wait_for(lambda: len(processes_in(build)) >= 2, timeout=60, interval=0.2)  # make and its compilers
    p.send_signal(signal.SIGINT)  # as Ctrl-C
    p.wait(timeout=30)
    assert p.returncode != 0
    wait_for(lambda: not processes_in(build), timeout=30, interval=0.2)
    wait_for(lambda: not list(build.glob(".build-*")), timeout=30, interval=0.2)
    assert not (build / "manifest.json").exists()
    assert json.loads(benv.run("kernel", "list", "--json", check=True).stdout) == []
    log = (benv.state_dir / "bangerd.log").read_text()
    assert "cancelled" in log


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT)  # compiles the kernel when the test cache has none (~5 min on 2 cores)
def test_pull_builds_once_and_boots_on_microvm(kenv):
    # on a terminal (script(1)), as a user would run it
    cmd = " ".join([BANGER, "kernel", "pull", "microvm-6.1"])
    r = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], env=kenv.env(), capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    assert r.returncode == 0, r.stdout[-2000:]
    if "compiling vmlinux" in r.stdout:  # compiled now, not reused from the test cache
        assert re.search(r"kernel microvm-6\.1 \[#+\s*\] +\d+\.\d% \d+/~\d+ steps", r.stdout), r.stdout[-2000:]
        assert "100.0%" in r.stdout
    k = json.loads(kenv.run("kernel", "show", "microvm-6.1", "--json", check=True).stdout)
    assert k["kernel"] == k["vmlinux"] and Path(k["vmlinux"]).read_bytes()[:4] == b"\x7fELF"
    assert k["initrd"] is None and k["modules"] is None
    assert k["source"] == f"microvm-6.1#recipe:debian-source-microvm/{mk.recipe_id()}" and k["stale"] is None
    # pulled again: nothing to do
    assert "pull kernel" not in kenv.run("kernel", "pull", "microvm-6.1", check=True).stderr

    a = ga.busybox_assets()
    # an image made for the cloud kernel, booted with the microVM kernel instead
    kenv.run("kernel", "import", "cloud", "--from", str(a["kernel_dir"]), check=True)
    kenv.run("image", "register", "bb", "--rootfs", str(a["rootfs"]), "--kernel-ref", "cloud", check=True)
    kenv.run(
        "vm",
        "create",
        "--name",
        "micro",
        "--image",
        "bb",
        "--kernel",
        "microvm-6.1",
        "--vcpu",
        "2",
        "--memory",
        "256M",
        timeout=300,
        check=True,
    )
    text = wait_for(
        lambda: (t := kenv.run("vm", "logs", "micro", "-n", "0").stdout) and ga.BOOT_MARKER in t and t, timeout=180, interval=0.5
    )
    assert "nproc=2" in text and "Linux version 6.1." in text and "banger-initrd" not in text
    vm = json.loads(kenv.run("vm", "show", "micro", "--json", check=True).stdout)
    assert vm["spec"]["kernel"] == "microvm-6.1"
    argv = Path(f"/proc/{vm['pid']}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-M") + 1].startswith(b"microvm,acpi=on") and b"-initrd" not in argv and k["vmlinux"].encode() in argv
    # told the host's TSC rate (no HPET/PM timer on microvm to calibrate against under TCG)
    append = argv[argv.index(b"-append") + 1].decode()
    assert re.search(r"\btsc_early_khz=\d+\b", append), append
    assert "Calibrating delay loop (skipped)" in text and "could not calculate TSC khz" not in text
    if "tsc=reliable" in append:  # the host keeps time with its TSC: so does the guest
        assert "Marking TSC unstable" not in text and "Switched to clocksource tsc" in text
    r = kenv.run("kernel", "rm", "microvm-6.1")
    assert r.returncode == 1 and "kernel 'microvm-6.1' is used by VM(s) micro" in r.stderr
    # built-in evdev + ACPI button: the guest's acpid sees the power button
    kenv.run("vm", "stop", "micro", timeout=120, check=True)
    assert f"{ga.POWEROFF_MARKER} acpi-power-button" in kenv.run("vm", "logs", "micro", "-n", "0").stdout
    kenv.run("vm", "delete", "micro", check=True)
    kenv.run("kernel", "rm", "microvm-6.1", check=True)
