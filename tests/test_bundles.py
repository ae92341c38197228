"""Image and kernel bundles served by a local HTTP server: made with `banger ... bundle`,
pulled through a catalog entry, booted; truncated, wrong-hash and hostile bundles are
refused and leave nothing behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

import guest_assets as ga
from conftest import BANGER, wait_for


@pytest.fixture
def benv_assets(benv):
    a = ga.busybox_assets()
    benv.write_config("[vmm]\naccel = 'tcg'\n")
    benv.run("kernel", "import", "src-kernel", "--from", str(a["kernel_dir"]), check=True)
    benv.run("image", "register", "src-image", "--rootfs", str(a["rootfs"]), "--kernel-ref", "src-kernel", check=True)
    return benv


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def use_catalog(env, tmp_path, kernels=None, images=None) -> None:
    cat = tmp_path / "catalog.json"
    cat.write_text(json.dumps({"version": 1, "kernels": kernels or {}, "images": images or {}}))
    env.write_config(f"[vmm]\naccel = 'tcg'\n[catalog]\npath = '{cat}'\n")


def use_bundled_catalog(env, tmp_path, kernel_url: str, ker: dict, image_url: str, img: dict) -> None:
    """A catalog whose kernel `bk` and image `bb` are the bundles ``ker`` and ``img``
    (what `bundle --json` printed) served at those URLs."""
    use_catalog(
        env,
        tmp_path,
        kernels={"bk": {"description": "bundled", "bundle": {"url": kernel_url, "sha256": ker["sha256"], "size": ker["size"]}}},
        images={
            "bb": {
                "description": "bundled",
                "kernel_ref": "bk",
                "bundle": {"url": image_url, "sha256": img["sha256"], "size": img["size"]},
            }
        },
    )


def hostile_bundle(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        m = json.dumps({"kind": "image", "name": "x", "files": {"rootfs": "rootfs.ext4"}}).encode()
        ti = tarfile.TarInfo("manifest.json")
        ti.size = len(m)
        tar.addfile(ti, io.BytesIO(m))
        tar.addfile(member, io.BytesIO(data) if data else None)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))


def nothing_left(env, name: str) -> None:
    assert name not in {i["name"] for i in json.loads(env.run("image", "list", "--json", check=True).stdout)}
    bundles = env.root / "cache" / "bundles"
    assert not bundles.exists() or not [p.name for p in bundles.iterdir()], list(bundles.iterdir())
    assert not (env.state_dir / "images" / name).exists()


@pytest.mark.slow
def test_bundle_round_trip_pull_and_boot(benv_assets, http_dir, tmp_path):
    env = benv_assets
    www, url = http_dir
    img = json.loads(env.run("image", "bundle", "src-image", "-o", str(www / "img.tar.zst"), "--json", check=True).stdout)
    ker = json.loads(env.run("kernel", "bundle", "src-kernel", "-o", str(www / "k.tar.zst"), "--json", check=True).stdout)
    assert img["sha256"] == sha(www / "img.tar.zst") and img["size"] == (www / "img.tar.zst").stat().st_size
    # reproducible: the same input makes the same bundle
    again = json.loads(env.run("kernel", "bundle", "src-kernel", "-o", str(tmp_path / "k2.tar.zst"), "--json", check=True).stdout)
    assert again["sha256"] == ker["sha256"]
    use_bundled_catalog(env, tmp_path, f"{url}/k.tar.zst", ker, f"{url}/img.tar.zst", img)
    r = env.run("image", "pull", "bb", timeout=300, check=True)
    assert "image bb:" in r.stdout and "(kernel bk)" in r.stdout
    # not a terminal: one line per download, no bar
    assert re.search(r"download kernel bk \(\d+\.\d MB\)", r.stderr) and "download image bb" in r.stderr
    assert "#" not in r.stderr
    # on a terminal: a progress bar
    env.run("image", "delete", "bb", check=True)
    cmd = " ".join([BANGER, "image", "pull", "bb"])
    tty = subprocess.run(["script", "-qec", cmd, "/dev/null"], env=env.env(), capture_output=True, text=True, timeout=300)
    assert tty.returncode == 0, tty.stdout
    assert re.search(r"image bb \[#+\s*\] 100\.0%", tty.stdout), tty.stdout[-500:]
    k = {x["name"]: x for x in json.loads(env.run("kernel", "list", "--json", check=True).stdout)}["bk"]
    assert Path(k["kernel"]).is_file() and Path(k["initrd"]).is_file() and Path(k["modules"]).is_dir()
    assert Path(k["vmlinux"]).read_bytes()[:4] == b"\x7fELF"  # the bundle carries the ELF kernel too
    assert k["source"] == f"bk#bundle:{ker['sha256']}" and k["stale"] is None
    env.run("vm", "create", "--name", "frombundle", "--image", "bb", "--vcpu", "1", "--memory", "256M", timeout=300, check=True)
    wait_for(lambda: ga.BOOT_MARKER in env.run("vm", "logs", "frombundle", "-n", "0").stdout, timeout=180, interval=0.5)

    # The catalog moves on (a new bundle for bb): the pulled image is stale, and is
    # not rebuilt while a VM uses it.
    src = json.loads(env.run("image", "show", "src-image", "--json", check=True).stdout)["rootfs"]
    changed = tmp_path / "changed.ext4"
    shutil.copyfile(src, changed)
    subprocess.run(["e2label", str(changed), "changed"], check=True)
    env.run("image", "register", "src-image2", "--rootfs", str(changed), "--kernel-ref", "src-kernel", check=True)
    img2 = json.loads(env.run("image", "bundle", "src-image2", "-o", str(www / "img2.tar.zst"), "--json", check=True).stdout)
    use_bundled_catalog(env, tmp_path, f"{url}/k.tar.zst", ker, f"{url}/img2.tar.zst", img2)
    why = f"made by catalog at bundle:{img['sha256']}, it now makes bundle:{img2['sha256']}; `banger image pull bb` refreshes it"
    bb = {i["name"]: i for i in json.loads(env.run("image", "list", "--json", check=True).stdout)}["bb"]
    assert bb["stale"] == why
    assert f"bb: stale, {why}" in env.run("image", "list", check=True).stdout
    # creating a VM from it still works, and says so
    r = env.run(
        "vm", "create", "--name", "staleuser", "--image", "bb", "--vcpu", "1", "--memory", "128M", timeout=300, check=True
    )
    assert f"note: image bb is stale: {why}" in r.stderr
    r = env.run("image", "pull", "bb", timeout=300)
    assert r.returncode == 1 and "image 'bb' is used by VM(s) frombundle, staleuser: delete them before rebuilding it" in r.stderr
    assert json.loads(env.run("image", "show", "bb", "--json", check=True).stdout)["source"] == f"bb#bundle:{img['sha256']}"
    env.run("vm", "delete", "frombundle", "staleuser", "--force", check=True)
    r = env.run("image", "pull", "bb", timeout=300, check=True)
    assert f"image bb is stale: {why}" in r.stderr and "download image bb" in r.stderr and "download kernel" not in r.stderr
    bb = json.loads(env.run("image", "show", "bb", "--json", check=True).stdout)
    assert bb["source"] == f"bb#bundle:{img2['sha256']}" and bb["stale"] is None
    label = subprocess.run(["e2label", bb["rootfs"]], capture_output=True, text=True, check=True).stdout.strip()
    assert label == "changed"
    # current now: pulling again does nothing
    assert "download" not in env.run("image", "pull", "bb", check=True).stderr
    nothing_left(env, "never-pulled")


def test_bad_bundles_are_refused_and_leave_nothing(benv_assets, http_dir, tmp_path):
    env = benv_assets
    www, url = http_dir
    img = json.loads(env.run("image", "bundle", "src-image", "-o", str(www / "img.tar.zst"), "--json", check=True).stdout)
    whole = (www / "img.tar.zst").read_bytes()
    (www / "short.tar.zst").write_bytes(whole[: len(whole) // 2])

    evil = tarfile.TarInfo("../evil")
    evil.size = 4
    hostile_bundle(www / "traversal.tar.zst", evil, b"evil")
    link = tarfile.TarInfo("rootfs.ext4")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
    hostile_bundle(www / "link.tar.zst", link)
    dev = tarfile.TarInfo("rootfs.ext4")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    hostile_bundle(www / "device.tar.zst", dev)
    absolute = tarfile.TarInfo("/tmp/banger-absolute-evil")
    absolute.size = 4
    hostile_bundle(www / "absolute.tar.zst", absolute, b"evil")
    (www / "garbage.tar.zst").write_bytes(b"this is not zstd at all")

    def entry(file: str, digest: str | None = None, size: int | None = None) -> dict:
        path = www / file
        return {
            "description": file,
            "kernel_ref": "src-kernel",
            "bundle": {
                "url": f"{url}/{file}",
                "sha256": digest or sha(path),
                "size": size if size is not None else path.stat().st_size,
            },
        }

    cases = {
        "truncated": (
            entry("short.tar.zst", img["sha256"], img["size"]),
            r"got \d+ bytes, the catalog says \d+ \(truncated download\?\)",
        ),
        "wronghash": (entry("img.tar.zst", "0" * 64), r"sha256 [0-9a-f]{64} does not match the catalog's 0{64}"),
        "traversal": (entry("traversal.tar.zst"), r"bundle entry '\.\./evil': absolute or '\.\.' paths are not allowed"),
        "link": (entry("link.tar.zst"), r"link to '\.\./\.\./\.\./etc/passwd' leaves the bundle"),
        "device": (entry("device.tar.zst"), r"devices, FIFOs and other special files are not allowed"),
        "absolute": (entry("absolute.tar.zst"), r"absolute or '\.\.' paths are not allowed"),
        "garbage": (entry("garbage.tar.zst"), r"not a valid \.tar\.zst bundle"),
        "missing": (
            {
                "description": "404",
                "kernel_ref": "src-kernel",
                "bundle": {"url": f"{url}/nope.tar.zst", "sha256": "0" * 64, "size": 1},
            },
            r"HTTP Error 404",
        ),
    }
    use_catalog(env, tmp_path, images={name: e for name, (e, _) in cases.items()})
    for name, (_, pattern) in cases.items():
        r = env.run("image", "pull", name, timeout=120)
        assert r.returncode == 1 and re.search(pattern, r.stderr), (name, r.stderr)
        nothing_left(env, name)
    assert not Path("/tmp/banger-absolute-evil").exists()
    assert not (env.root / "cache" / "evil").exists() and not (env.root / "evil").exists()


def test_truncated_bundles_and_wrong_kinds_say_so(benv, http_dir, tmp_path):
    """A bundle cut short (its catalog entry made from the short file, so the hash
    matches) is reported as truncated wherever the cut falls; a bundle of the other
    kind is named with the right article."""
    from banger_core import bundles

    env = benv
    www, url = http_dir
    k = tmp_path / "k"
    k.mkdir()
    (k / "vmlinuz").write_bytes(os.urandom(64 << 10))
    env.run("kernel", "import", "k1", "--from", str(k), check=True)
    rootfs = tmp_path / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(rootfs), "8M"], check=True)
    with open(rootfs, "r+b") as fh:  # some incompressible content, so cuts land inside the data
        fh.seek(4 << 20)
        fh.write(os.urandom(1 << 20))
    bundles.create(www / "img.tar.zst", "image", "img", {"rootfs": rootfs})
    bundles.create(www / "k.tar.zst", "kernel", "k", {"kernel": k / "vmlinuz"})
    whole = (www / "img.tar.zst").read_bytes()

    def entry(file: str, sized: bool = True, kind: str = "image") -> dict:
        b = {"url": f"{url}/{file}", "sha256": sha(www / file)}
        if sized:  # a catalog size is at least 1 byte: the empty cut goes unsized
            b["size"] = (www / file).stat().st_size
        return {"description": file, "bundle": b, **({"kernel_ref": "k1"} if kind == "image" else {})}

    cuts = {"cut0": 0, "cut5": 5, "cut600": 600, "cuthalf": len(whole) // 2, "cutend": len(whole) - 3}
    imgs = {}
    for name, n in cuts.items():
        (www / f"{name}.tar.zst").write_bytes(whole[:n])
        imgs[name] = entry(f"{name}.tar.zst", sized=name not in ("cut0", "cut600"))
    imgs["kernelbundle"] = entry("k.tar.zst")
    use_catalog(env, tmp_path, kernels={"imagebundle": entry("img.tar.zst", kind="kernel")}, images=imgs)
    for name in cuts:
        r = env.run("image", "pull", name, timeout=120)
        assert r.returncode == 1 and f"{name}.tar.zst: truncated or incomplete bundle" in r.stderr, (name, r.stderr)
        assert "empty file" not in r.stderr and "lacks" not in r.stderr
        nothing_left(env, name)
    r = env.run("image", "pull", "kernelbundle", timeout=120)
    assert r.returncode == 1 and "k.tar.zst: a kernel bundle, not an image bundle" in r.stderr, r.stderr
    nothing_left(env, "kernelbundle")
    r = env.run("kernel", "pull", "imagebundle", timeout=120)
    assert r.returncode == 1 and "img.tar.zst: an image bundle, not a kernel bundle" in r.stderr, r.stderr
    assert "imagebundle" not in {x["name"] for x in json.loads(env.run("kernel", "list", "--json", check=True).stdout)}


def test_a_bundle_file_on_this_host_is_pulled_by_path(benv, tmp_path):
    """The built-in `file` source: `image pull PATH.tar.zst` and `kernel pull
    PATH.tar.zst` (a path relative to the CLI's directory works too), named after the
    file or --name; a second pull of the same name is refused; a bundle of the other
    kind or a missing file leaves nothing."""
    from banger_core import bundles

    k = tmp_path / "k"
    k.mkdir()
    (k / "vmlinuz").write_bytes(os.urandom(64 << 10))
    rootfs = tmp_path / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(rootfs), "8M"], check=True)
    bundles.create(tmp_path / "kfile.tar.zst", "kernel", "k", {"kernel": k / "vmlinuz"})
    bundles.create(tmp_path / "ifile.tar.zst", "image", "img", {"rootfs": rootfs}, {"kernel_ref": "kfile"})

    kernel = json.loads(benv.run("kernel", "pull", str(tmp_path / "kfile.tar.zst"), "--json", check=True).stdout)
    assert kernel["name"] == "kfile" and kernel["source"] == f"{tmp_path}/kfile.tar.zst#sha256:{sha(tmp_path / 'kfile.tar.zst')}"
    # relative to where the CLI runs
    r = subprocess.run(
        [BANGER, "image", "pull", "ifile.tar.zst", "--json"], env=benv.env(), cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    img = json.loads(r.stdout)
    assert img["name"] == "ifile" and img["kernel_ref"] == "kfile" and img["managed"]
    assert img["source"] == f"{tmp_path}/ifile.tar.zst#sha256:{sha(tmp_path / 'ifile.tar.zst')}"
    assert Path(img["rootfs"]).read_bytes() == rootfs.read_bytes()
    shown = json.loads(benv.run("image", "show", "ifile", "--json", check=True).stdout)
    assert shown["stale"] is None  # a file's bundle is a snapshot: never stale

    r = benv.run("image", "pull", str(tmp_path / "ifile.tar.zst"))
    assert r.returncode == 1 and "image 'ifile' already exists (choose another --name)" in r.stderr, r.stderr
    benv.run("image", "pull", f"file://{tmp_path}/ifile.tar.zst", "--name", "ifile2", check=True)
    r = benv.run("image", "pull", str(tmp_path / "ifile.tar.zst"), "--size", "1G", "--name", "x")
    assert r.returncode == 1 and "--size do(es) not apply to" in r.stderr and "(source file, plugin catalog" in r.stderr

    r = benv.run("image", "pull", str(tmp_path / "kfile.tar.zst"), "--name", "wrongkind")
    assert r.returncode == 1 and "kfile.tar.zst: a kernel bundle, not an image bundle" in r.stderr, r.stderr
    r = benv.run("image", "pull", str(tmp_path / "gone.tar.zst"))
    assert r.returncode == 1 and "gone.tar.zst: no such bundle file" in r.stderr, r.stderr
    names = [i["name"] for i in json.loads(benv.run("image", "list", "--json", check=True).stdout)]
    assert sorted(names) == ["ifile", "ifile2"]
    assert sorted(p.name for p in (benv.state_dir / "images").iterdir()) == ["ifile", "ifile2"]
