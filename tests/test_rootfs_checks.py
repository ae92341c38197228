"""Every rootfs banger takes is checked the same way (images.publish_rootfs /
check_rootfs): a clean ext4 (e2fsck -fn) whose superblock size is the file's size,
within [images] max_rootfs_size. Refused from a catalog bundle, by image register
(in place) and by image promote, with a message naming the file and the fault, and
nothing left behind: no image row, no file in the images dir, no staging dir."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from test_bundles import use_catalog

GIB = 1 << 30


def mkfs(path: Path, size: str = "8M") -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path), size], check=True, capture_output=True)
    return path


def not_ext4(path: Path) -> Path:
    path.write_bytes(os.urandom(4 << 20))
    return path


def corrupt(path: Path) -> Path:
    mkfs(path)
    # the root directory's link count made wrong: the superblock is fine, e2fsck is not
    subprocess.run(["debugfs", "-w", "-R", "set_inode_field <2> links_count 9", str(path)], check=True, capture_output=True)
    return path


def truncated(path: Path) -> Path:
    mkfs(path)
    os.truncate(path, 4 << 20)
    return path


def extended(path: Path) -> Path:
    mkfs(path)
    os.truncate(path, 12 << 20)
    return path


BAD = {
    "notext4": (not_ext4, r"not an ext4 filesystem \(no ext4 superblock\)"),
    "corrupt": (corrupt, r"not a clean ext4 filesystem \(e2fsck -fn exited 4: .*Inode 2 ref count is 9"),
    "truncated": (
        truncated,
        r"its ext4 superblock says 8388608 bytes but the file has 4194304 \(the file was truncated after mkfs",
    ),
    "extended": (
        extended,
        r"its ext4 superblock says 8388608 bytes but the file has 12582912 \(the file was extended after mkfs",
    ),
}


@pytest.fixture
def kenv(benv, tmp_path):
    k = tmp_path / "k"
    k.mkdir()
    (k / "vmlinuz").write_bytes(b"kernel")
    benv.run("kernel", "import", "k1", "--from", str(k), check=True)
    return benv


def image_names(env) -> set[str]:
    return {i["name"] for i in json.loads(env.run("image", "list", "--json", check=True).stdout)}


def nothing_left(env, name: str) -> None:
    assert name not in image_names(env)
    images = env.state_dir / "images"
    assert not images.exists() or not list(images.iterdir()), list(images.iterdir())
    bundles = env.root / "cache" / "bundles"
    assert not bundles.exists() or not list(bundles.iterdir()), list(bundles.iterdir())


class _Claim(io.RawIOBase):
    """A file's head followed by zeros up to ``size``: a sparse file's content, made
    without reading a sparse file (which is slow)."""

    def __init__(self, head: bytes, size: int) -> None:
        self.head, self.size, self.pos = head, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        chunk = self.head[self.pos : self.pos + n] if self.pos < len(self.head) else b""
        b[:n] = chunk + bytes(n - len(chunk))
        self.pos += n
        return n


def image_bundle(path: Path, rootfs_head: bytes, size: int) -> dict:
    """An image bundle whose rootfs.ext4 is ``rootfs_head`` padded with zeros to ``size``."""
    with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as zw:
        with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            m = json.dumps({"kind": "image", "name": "x", "files": {"rootfs": "rootfs.ext4"}}).encode()
            ti = tarfile.TarInfo("manifest.json")
            ti.size = len(m)
            tar.addfile(ti, io.BytesIO(m))
            ti = tarfile.TarInfo("rootfs.ext4")
            ti.size = size
            tar.addfile(ti, io.BufferedReader(_Claim(rootfs_head, size), 1 << 20))
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}


def entry(url: str, file: str, b: dict) -> dict:
    return {"description": file, "kernel_ref": "k1", "bundle": {"url": f"{url}/{file}", **b}}


def test_sparse_10g_rootfs_in_a_small_bundle_is_refused(kenv, http_dir, tmp_path):
    env = kenv
    www, url = http_dir
    small = mkfs(tmp_path / "small.ext4", "1M")
    b = image_bundle(www / "sparse.tar.zst", small.read_bytes(), 10 * GIB)
    assert b["size"] < 1 << 20  # a 10 GiB claim in under 1 MiB
    use_catalog(env, tmp_path, images={"sparse": entry(url, "sparse.tar.zst", b)})
    r = env.run("image", "pull", "sparse", timeout=300)
    assert r.returncode == 1, r.stderr
    assert re.search(r"rootfs \S*rootfs\.ext4: its ext4 superblock says 1048576 bytes but the file has 10737418240", r.stderr), (
        r.stderr
    )
    nothing_left(env, "sparse")


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_rootfs_refused_from_bundle_register_and_promote(kenv, http_dir, tmp_path, kind):
    env = kenv
    www, url = http_dir
    make, pattern = BAD[kind]
    bad = make(tmp_path / f"{kind}.ext4")
    # a catalog bundle
    b = image_bundle(www / f"{kind}.tar.zst", bad.read_bytes(), bad.stat().st_size)
    use_catalog(env, tmp_path, images={kind: entry(url, f"{kind}.tar.zst", b)})
    r = env.run("image", "pull", kind, timeout=120)
    assert r.returncode == 1 and re.search(r"rootfs \S+rootfs\.ext4: " + pattern, r.stderr), r.stderr
    nothing_left(env, kind)
    # image register: checked in place, read-only (the file is untouched)
    before = hashlib.sha256(bad.read_bytes()).hexdigest()
    r = env.run("image", "register", kind, "--rootfs", str(bad), "--kernel-ref", "k1")
    assert r.returncode == 1 and re.search(f"rootfs {re.escape(str(bad))}: " + pattern, r.stderr), r.stderr
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == before
    nothing_left(env, kind)
    # with its own kernel: the kernel is not imported either
    r = env.run("image", "register", kind, "--rootfs", str(bad), "--kernel", str(tmp_path / "k" / "vmlinuz"))
    assert r.returncode == 1 and re.search(pattern, r.stderr), r.stderr
    assert kind not in {k["name"] for k in json.loads(env.run("kernel", "list", "--json", check=True).stdout)}
    # image promote: a registered rootfs that went bad afterwards
    good = mkfs(tmp_path / f"{kind}-later.ext4")
    env.run("image", "register", f"{kind}-later", "--rootfs", str(good), "--kernel-ref", "k1", check=True)
    make(good)
    r = env.run("image", "promote", f"{kind}-later")
    assert r.returncode == 1 and re.search(f"rootfs {re.escape(str(good))}: " + pattern, r.stderr), r.stderr
    shown = json.loads(env.run("image", "show", f"{kind}-later", "--json", check=True).stdout)
    assert not shown["managed"] and shown["rootfs"] == str(good)
    env.run("image", "delete", f"{kind}-later", check=True)
    nothing_left(env, f"{kind}-later")


def test_rootfs_over_max_rootfs_size_is_refused(kenv, http_dir, tmp_path):
    env = kenv
    www, url = http_dir
    big = mkfs(tmp_path / "big.ext4", "32M")
    env.run("image", "register", "early", "--rootfs", str(big), "--kernel-ref", "k1", check=True)  # default limit: fine
    b = image_bundle(www / "big.tar.zst", big.read_bytes(), big.stat().st_size)
    cat = tmp_path / "catalog.json"
    cat.write_text(json.dumps({"kernels": {}, "images": {"big": entry(url, "big.tar.zst", b)}}))
    env.write_config(f"[catalog]\npath = '{cat}'\n[images]\nmax_rootfs_size = 16\n")
    over = r"32 MiB is over \[images\] max_rootfs_size \(16 MiB\)"
    r = env.run("image", "pull", "big", timeout=120)
    # refused while unpacking, before it is written
    assert r.returncode == 1 and re.search(r"bundle entry 'rootfs\.ext4': " + over, r.stderr), r.stderr
    nothing_left(env, "big")
    r = env.run("image", "register", "big", "--rootfs", str(big), "--kernel-ref", "k1")
    assert r.returncode == 1 and re.search(f"rootfs {re.escape(str(big))}: " + over, r.stderr), r.stderr
    r = env.run("image", "promote", "early")
    assert r.returncode == 1 and re.search(f"rootfs {re.escape(str(big))}: " + over, r.stderr), r.stderr
    assert not json.loads(env.run("image", "show", "early", "--json", check=True).stdout)["managed"]
    env.run("image", "delete", "early", check=True)
    nothing_left(env, "big")
    # a small one still passes everywhere under the same limit
    ok = mkfs(tmp_path / "ok.ext4", "8M")
    env.run("image", "register", "ok", "--rootfs", str(ok), "--kernel-ref", "k1", check=True)
    promoted = json.loads(env.run("image", "promote", "ok", "--json", check=True).stdout)
    assert promoted["managed"] and Path(promoted["rootfs"]).read_bytes() == ok.read_bytes()
    assert [p.name for p in (env.state_dir / "images" / "ok").iterdir()] == ["rootfs.ext4"]
