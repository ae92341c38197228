"""kernel import --from an unpacked kernel package (boot/ + lib/modules/), as the
original tool took it: the version in both, --version among several, the files taken
said; the flat layout still works. image pull --kernel/--initrd/--modules (a kernel
named after the image), exclusive with --kernel-ref in the CLI and the daemon."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from banger_core.client import Client
from banger_core.errors import BangerError, ErrorCode
from banger_core.paths import Paths
from oci_fixtures import missing_tools


def bzimage() -> bytes:
    """A bzImage-like file: the boot sector's 'HdrS' header and protocol 2.15."""
    data = bytearray(os.urandom(16 << 10))
    data[0x1F1] = 4
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x20F)
    return bytes(data)


def elf() -> bytes:
    return b"\x7fELF\x02\x01\x01" + bytes(9) + os.urandom(8 << 10)


def package(root: Path, versions: dict[str, dict[str, bytes]], modules: list[str]) -> Path:
    (root / "boot").mkdir(parents=True)
    for v, files in versions.items():
        for stem, data in files.items():
            (root / "boot" / stem.replace("V", v)).write_bytes(data)
        (root / "boot" / f"config-{v}").write_text("CONFIG_X=y\n")
        (root / "boot" / f"System.map-{v}").write_text("")
    for v in modules:
        d = root / "lib" / "modules" / v / "kernel" / "fs"
        d.mkdir(parents=True)
        (d / "ext4.ko").write_bytes(b"\x7fELFmodule")
        (root / "lib" / "modules" / v / "modules.dep").write_text("kernel/fs/ext4.ko:\n")
    return root


def kernels(env) -> dict:
    return {k["name"]: k for k in json.loads(env.run("kernel", "list", "--json", check=True).stdout)}


def test_package_layout_one_version(benv, tmp_path):
    v = "6.1.0-9-amd64"
    pkg = package(tmp_path / "pkg", {v: {"vmlinuz-V": bzimage(), "initrd.img-V": b"initrd"}}, [v])
    r = benv.run("kernel", "import", "deb", "--from", str(pkg), "--json", check=True)
    res = json.loads(r.stdout)
    assert res["taken"] == {
        "version": v,
        "kernel": str(pkg / "boot" / f"vmlinuz-{v}"),
        "vmlinux": None,
        "initrd": str(pkg / "boot" / f"initrd.img-{v}"),
        "modules": str(pkg / "lib" / "modules" / v),
    }
    k = kernels(benv)["deb"]
    assert Path(k["kernel"]).read_bytes() == (pkg / "boot" / f"vmlinuz-{v}").read_bytes()
    assert Path(k["initrd"]).read_bytes() == b"initrd"
    assert (Path(k["modules"]) / v / "modules.dep").is_file()  # modules/<version>/, as pulled kernels have them
    assert (Path(k["modules"]) / v / "kernel" / "fs" / "ext4.ko").is_file()
    # the CLI says which files it took
    out = benv.run("kernel", "import", "deb2", "--from", str(pkg), check=True).stdout
    assert f"version {v}" in out
    for f in (f"boot/vmlinuz-{v}", f"boot/initrd.img-{v}", f"lib/modules/{v}"):
        assert str(pkg / f) in out, (f, out)


def test_package_layout_elf_vmlinux_and_initramfs(benv, tmp_path):
    v = "6.6.7-200.fc39.x86_64"
    pkg = package(tmp_path / "pkg", {v: {"vmlinux-V": elf(), "initramfs-V.img": b"initramfs"}}, [v])
    res = json.loads(benv.run("kernel", "import", "fed", "--from", str(pkg), "--json", check=True).stdout)
    assert res["taken"]["kernel"] == str(pkg / "boot" / f"vmlinux-{v}")
    assert res["taken"]["initrd"] == str(pkg / "boot" / f"initramfs-{v}.img")
    k = kernels(benv)["fed"]
    assert Path(k["vmlinux"]).read_bytes()[:4] == b"\x7fELF" and Path(k["initrd"]).read_bytes() == b"initramfs"


def test_package_layout_several_versions_needs_version(benv, tmp_path):
    a, b, orphan = "6.1.0-8-amd64", "6.1.0-9-amd64", "6.5.0-1-amd64"
    pkg = package(
        tmp_path / "pkg",
        {
            a: {"vmlinuz-V": bzimage(), "initrd.img-V": b"A"},
            b: {"vmlinuz-V": bzimage(), "vmlinux-V": elf(), "initrd.img-V": b"B"},
            orphan: {"vmlinuz-V": bzimage()},
        },  # no modules: not a candidate
        [a, b, "5.10.0-1-amd64"],
    )  # modules without a kernel: not one either
    r = benv.run("kernel", "import", "k", "--from", str(pkg))
    assert r.returncode == 1, r.stderr
    assert f"several kernel versions in boot/ and lib/modules/: {a}, {b}; pick one with --version" in r.stderr, r.stderr
    r = benv.run("kernel", "import", "k", "--from", str(pkg), "--version", orphan)
    assert r.returncode == 1 and f"no kernel version '{orphan}' in both boot/ and lib/modules/ (there: {a}, {b})" in r.stderr, (
        r.stderr
    )
    assert "k" not in kernels(benv)
    res = json.loads(benv.run("kernel", "import", "k", "--from", str(pkg), "--version", b, "--json", check=True).stdout)
    assert res["taken"]["version"] == b and res["taken"]["vmlinux"] == str(pkg / "boot" / f"vmlinux-{b}")
    k = kernels(benv)["k"]
    assert Path(k["initrd"]).read_bytes() == b"B" and [p.name for p in Path(k["modules"]).iterdir()] == [b]
    assert Path(k["vmlinux"]).read_bytes()[:4] == b"\x7fELF" and Path(k["kernel"]).read_bytes()[0x202:0x206] == b"HdrS"
    # nothing in common at all
    none = package(tmp_path / "none", {a: {"vmlinuz-V": bzimage()}}, [b])
    r = benv.run("kernel", "import", "n", "--from", str(none))
    assert r.returncode == 1 and f"no kernel version in both boot/ ({a}) and lib/modules/ ({b})" in r.stderr, r.stderr
    kdir = benv.state_dir / "kernels"
    assert sorted(p.name for p in kdir.iterdir()) == ["k"]  # no staging dir left by the refusals


def test_flat_layout_still_works_and_says_what_it_took(benv, tmp_path):
    d = tmp_path / "flat"
    (d / "modules" / "6.1.0-test").mkdir(parents=True)
    (d / "vmlinuz").write_bytes(bzimage())
    (d / "initrd.img").write_bytes(b"initrd")
    res = json.loads(benv.run("kernel", "import", "flat", "--from", str(d), "--json", check=True).stdout)
    assert res["taken"] == {
        "version": None,
        "kernel": str(d / "vmlinuz"),
        "vmlinux": None,
        "initrd": str(d / "initrd.img"),
        "modules": str(d / "modules"),
    }
    r = benv.run("kernel", "import", "flat2", "--from", str(d), "--version", "6.1.0-test")
    assert r.returncode == 1 and "--version picks among the versions of a package tree (boot/ + lib/modules/)" in r.stderr


@pytest.mark.oci
def test_image_pull_kernel_options_are_exclusive_with_kernel_ref(benv, tmp_path):
    k = tmp_path / "vmlinuz"
    k.write_bytes(bzimage())
    r = benv.run("image", "pull", "127.0.0.1:1/x:1", "--kernel", str(k), "--kernel-ref", "debian-cloud")
    assert r.returncode == 1 and "give either --kernel-ref or --kernel [--initrd] [--modules], not both" in r.stderr, r.stderr
    r = benv.run("image", "pull", "127.0.0.1:1/x:1", "--initrd", str(k))
    assert r.returncode == 1 and "--initrd and --modules go with --kernel" in r.stderr, r.stderr
    benv.run("image", "list", check=True)  # the CLI refused before starting a daemon: start one for the client
    client = Client(Paths.from_env(benv.env()))
    for params, msg in [
        ({"ref": "127.0.0.1:1/x:1", "kernel": str(k), "kernel_ref": "debian-cloud"}, "not both"),
        ({"ref": "127.0.0.1:1/x:1", "modules": str(tmp_path)}, "go with --kernel"),
        (
            {"ref": "debian-bookworm", "kernel": str(k)},
            "--kernel do\\(es\\) not apply to 'debian-bookworm' \\(source debian, plugin debian",
        ),
    ]:
        with pytest.raises(BangerError, match=msg) as ei:
            client.call("image.pull", params)
        assert ei.value.code is ErrorCode.BAD_REQUEST
    assert kernels(benv) == {}


@pytest.mark.skipif(bool(missing_tools()), reason=f"needs {missing_tools()} (scripts/install.sh installs them)")
@pytest.mark.oci
def test_image_pull_with_its_own_kernel(benv, oci_test_image, tmp_path):
    v = "6.1.0-9-amd64"
    k = tmp_path / "vmlinuz"
    k.write_bytes(bzimage())
    (tmp_path / "initrd.img").write_bytes(b"initrd")
    mods = tmp_path / "mods" / v
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    # a failed pull imports no kernel
    r = benv.run("image", "pull", oci_test_image["ref"].rsplit(":", 1)[0] + ":nope", "--name", "own", "--kernel", str(k))
    assert r.returncode == 1 and "not found" in r.stderr, r.stderr
    assert kernels(benv) == {}
    r = benv.run(
        "image",
        "pull",
        oci_test_image["ref"],
        "--name",
        "own",
        "--size",
        "64M",
        "--kernel",
        str(k),
        "--initrd",
        str(tmp_path / "initrd.img"),
        "--modules",
        str(mods),
        "--json",
        timeout=300,
        check=True,
    )
    img = json.loads(r.stdout)
    assert img["kernel_ref"] == "own"
    own = kernels(benv)["own"]
    assert Path(own["kernel"]).read_bytes() == k.read_bytes() and Path(own["initrd"]).read_bytes() == b"initrd"
    assert (Path(own["modules"]) / v / "modules.dep").is_file()  # modules/<version>/, as every kernel
    # a kernel of that name already there: refused before pulling, nothing changed
    r = benv.run("image", "pull", oci_test_image["ref"], "--name", "own", "--kernel", str(k))
    assert r.returncode == 1 and "already exists" in r.stderr
