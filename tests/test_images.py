"""Kernel import, image register (kernel ref xor own kernel), promote, show, delete."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from banger_core import images
from banger_core.errors import BangerError, ErrorCode
from banger_core.paths import Paths
from banger_core.store import Store
from banger_core.testing import sample_vm


@pytest.fixture
def kdir(tmp_path) -> Path:
    d = tmp_path / "k"
    (d / "modules" / "6.1.0-test").mkdir(parents=True)
    (d / "vmlinuz").write_bytes(b"kernel")
    (d / "initrd.img").write_bytes(b"initrd")
    (d / "modules" / "6.1.0-test" / "modules.dep").write_text("")
    return d


@pytest.fixture
def rootfs(tmp_path) -> Path:
    p = tmp_path / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(p), "8M"], check=True)
    return p


def test_register_needs_exactly_one_kernel_source(benv, kdir, rootfs):
    benv.run("kernel", "import", "k1", "--from", str(kdir), check=True)
    for args, msg in [
        ([], "give either --kernel-ref or --kernel"),
        (["--kernel-ref", "k1", "--kernel", str(kdir / "vmlinuz")], "give either --kernel-ref or --kernel"),
        (["--kernel-ref", "k1", "--initrd", str(kdir / "initrd.img")], "--initrd and --modules go with --kernel"),
        (["--kernel-ref", "nope"], "no kernel named 'nope'"),
    ]:
        r = benv.run("image", "register", "img", "--rootfs", str(rootfs), *args)
        assert r.returncode == 1 and msg in r.stderr, (args, r.stderr)
    from banger_core.client import Client

    client = Client(Paths.from_env(benv.env()))
    with pytest.raises(BangerError, match="not both") as ei:
        client.call("image.register", {"name": "img", "rootfs": str(rootfs), "kernel_ref": "k1", "kernel": str(kdir / "vmlinuz")})
    assert ei.value.code is ErrorCode.BAD_REQUEST
    assert json.loads(benv.run("image", "list", "--json", check=True).stdout) == []
    assert [k["name"] for k in json.loads(benv.run("kernel", "list", "--json", check=True).stdout)] == ["k1"]


def test_register_with_own_kernel_triple_and_show(benv, kdir, rootfs):
    r = benv.run(
        "image",
        "register",
        "own",
        "--rootfs",
        str(rootfs),
        "--kernel",
        str(kdir / "vmlinuz"),
        "--initrd",
        str(kdir / "initrd.img"),
        "--modules",
        str(kdir / "modules" / "6.1.0-test"),
        "--json",
        check=True,
    )
    img = json.loads(r.stdout)
    assert img["kernel_ref"] == "own" and not img["managed"]
    k = json.loads(benv.run("kernel", "show", "own", "--json", check=True).stdout)
    assert Path(k["kernel"]).read_bytes() == b"kernel" and Path(k["initrd"]).read_bytes() == b"initrd"
    # one version's dir lands under its name, as every kernel's modules do
    assert (Path(k["modules"]) / "6.1.0-test" / "modules.dep").exists() and k["used_by"] == ["own"]
    shown = benv.run("image", "show", "own", check=True).stdout
    assert "kernel_ref: own" in shown and "used_by:    -" in shown
    r = benv.run("kernel", "rm", "own")
    assert r.returncode == 1 and "used by image(s) own" in r.stderr


def test_promote_copies_into_managed_storage(benv, kdir, rootfs):
    benv.run("kernel", "import", "k1", "--from", str(kdir), check=True)
    benv.run("image", "register", "img", "--rootfs", str(rootfs), "--kernel-ref", "k1", check=True)
    r = benv.run("image", "promote", "img", "--json", check=True)
    img = json.loads(r.stdout)
    managed = Path(img["rootfs"])
    assert img["managed"] and managed.parent == benv.state_dir / "images" / "img"
    assert managed.read_bytes() == rootfs.read_bytes()
    rootfs.unlink()  # the original may go now
    assert json.loads(benv.run("image", "show", "img", "--json", check=True).stdout)["rootfs"] == str(managed)
    r = benv.run("image", "promote", "img")
    assert r.returncode == 1 and "already managed" in r.stderr
    benv.run("image", "delete", "img", check=True)
    assert not managed.parent.exists()


def test_image_in_use_cannot_be_deleted(tmp_path, kdir, rootfs):
    paths = Paths(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "r")
    store = Store(paths.db_file)
    images.import_kernel(store, paths, "k1", kdir)
    images.register_image(store, paths, "img", rootfs, kernel_ref="k1")
    store.insert_vm(sample_vm("user", image="img"))
    with pytest.raises(BangerError, match=r"image 'img' is used by VM\(s\) user"):
        images.delete_image(store, paths, "img")
    assert store.get_image("img").name == "img"


def test_failed_kernel_import_leaves_nothing(benv, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = benv.run("kernel", "import", "k", "--from", str(empty))
    assert r.returncode == 1 and "no kernel found" in r.stderr
    r = benv.run("kernel", "import", "Bad Name", "--from", str(empty))
    assert r.returncode == 1 and "invalid kernel name" in r.stderr
    kernels = benv.state_dir / "kernels"
    assert not kernels.exists() or not list(kernels.iterdir())


def test_register_with_an_init_that_must_be_in_the_image(benv, kdir, tmp_path):
    tree = tmp_path / "tree"
    (tree / "banger").mkdir(parents=True)
    (tree / "banger" / "init").write_text("#!/bin/sh\n")
    p = tmp_path / "init.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(p), "8M"], check=True)
    benv.run("kernel", "import", "k1", "--from", str(kdir), check=True)
    for init, msg in [
        ("banger/init", "must be an absolute path"),
        ("/banger/../etc/init", "must be an absolute path"),
        ("/banger/init;reboot", "must be an absolute path"),
        ("/banger/nosuch", "not in"),
    ]:
        r = benv.run("image", "register", "img", "--rootfs", str(p), "--kernel-ref", "k1", "--init", init)
        assert r.returncode == 1 and msg in r.stderr, (init, r.stderr)
    assert json.loads(benv.run("image", "list", "--json", check=True).stdout) == []
    r = benv.run("image", "register", "img", "--rootfs", str(p), "--kernel-ref", "k1", "--init", "/banger/init", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["init"] == "/banger/init", r.stderr
