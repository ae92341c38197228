"""OCI pulls against a real registry (Debian's docker-registry on 127.0.0.1), images
built in the test with umoci and pushed with skopeo: flattened with whiteouts, turned
into ext4 owned by root, booted; hostile layers refused."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

import guest_assets as ga
from banger_oci import registry as oci
from banger_core.errors import BangerError
from conftest import wait_for
from oci_fixtures import missing_tools, push_layers, push_multiarch_index, push_test_image

pytestmark = [
    pytest.mark.oci,
    pytest.mark.skipif(bool(missing_tools()), reason=f"needs {missing_tools()} (scripts/install.sh installs them)"),
]


def debugfs(image: Path, cmd: str) -> str:
    """What debugfs says, its version banner (stderr's first line) left out."""
    r = subprocess.run(["debugfs", "-R", cmd, str(image)], capture_output=True, text=True)
    return r.stdout + "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("debugfs "))


@pytest.fixture
def oenv(benv):
    cache = ga.default_cache_dir()
    kernel = ga.test_kernel(cache)
    benv.write_config("[vmm]\naccel = 'tcg'\n")
    benv.run("kernel", "import", "debian-cloud", "--from", str(Path(kernel["kernel"]).parent), check=True)
    return benv


def images(env) -> dict:
    return {i["name"]: i for i in json.loads(env.run("image", "list", "--json", check=True).stdout)}


# --- units -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,registry,repo,tag,name",
    [
        ("debian:bookworm", "registry-1.docker.io", "library/debian", "bookworm", "debian-bookworm"),
        ("127.0.0.1:5000/banger/busybox:1", "127.0.0.1:5000", "banger/busybox", "1", "busybox-1"),
        ("localhost:5000/x", "localhost:5000", "x", "latest", "x"),
        ("ghcr.io/org/tool", "ghcr.io", "org/tool", "latest", "tool"),
    ],
)
def test_parse_ref(text, registry, repo, tag, name):
    r = oci.parse_ref(text)
    assert (r.registry, r.repository, r.tag, r.friendly_name()) == (registry, repo, tag, name)


@pytest.mark.parametrize("text", ["UPPER/case", "a@sha256:123", "bad//repo"])
def test_parse_ref_rejects(text):
    with pytest.raises(BangerError):
        oci.parse_ref(text)


def layer(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for ti, data in entries:
            ti.size = len(data) if ti.isfile() else 0
            tar.addfile(ti, io.BytesIO(data) if ti.isfile() else None)
    path.write_bytes(buf.getvalue())
    return path


def ti(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type, t.linkname, t.mode = kind, link, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return t


@pytest.mark.parametrize(
    "name,msg",
    [("../escape", "'..' paths"), ("/abs", "absolute"), ("etc/bad\nname", "control characters")],
)
def test_unsafe_layer_names_refused(tmp_path, name, msg):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(BangerError, match=msg):
        oci.apply_layer(layer(tmp_path / "l.tar", [(ti(name), b"x")]), root)
    assert not (tmp_path / "escape").exists()


def test_symlinks_in_the_image_never_lead_outside(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    oci.apply_layer(
        layer(
            tmp_path / "1.tar", [(ti("etc", tarfile.SYMTYPE, str(outside)), b""), (ti("up", tarfile.SYMTYPE, "../../.."), b"")]
        ),
        root,
    )
    oci.apply_layer(layer(tmp_path / "2.tar", [(ti("etc/passwd"), b"guest"), (ti("up/x"), b"guest")]), root)
    assert not list(outside.iterdir())  # nothing written on the host through the link
    assert (root / str(outside).lstrip("/") / "passwd").read_text() == "guest"  # landed inside the tree
    assert (root / "x").read_text() == "guest"


def test_whiteouts_and_opaque_dirs(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    oci.apply_layer(
        layer(tmp_path / "1.tar", [(ti("d", tarfile.DIRTYPE), b""), (ti("d/old"), b"1"), (ti("gone"), b"1"), (ti("keep"), b"1")]),
        root,
    )
    oci.apply_layer(layer(tmp_path / "2.tar", [(ti("d/new"), b"2"), (ti("d/.wh..wh..opq"), b""), (ti(".wh.gone"), b"")]), root)
    assert sorted(p.name for p in (root / "d").iterdir()) == ["new"]  # opaque kept this layer's entry
    assert not (root / "gone").exists() and (root / "keep").exists()


HOSTILE_WHITEOUTS = [".wh...", ".wh..", ".wh.", "d/.wh...", "d/.wh..", "d/.wh.", "./.wh..", "d/./.wh..."]


@pytest.mark.parametrize("name", HOSTILE_WHITEOUTS)
def test_whiteouts_naming_dot_dotdot_or_nothing_are_refused(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "beside").write_text("host file beside the tree")
    oci.apply_layer(layer(tmp_path / "1.tar", [(ti("d", tarfile.DIRTYPE), b""), (ti("d/f"), b"1"), (ti("top"), b"1")]), root)
    with pytest.raises(BangerError, match=r"whiteout .* names no entry of its directory") as e:
        oci.apply_layer(layer(tmp_path / "2.tar", [(ti(name), b"")]), root)
    assert repr(name) in e.value.message and e.value.code.value == "bad_request"
    assert (root / "d" / "f").exists() and (root / "top").exists() and (tmp_path / "beside").exists()  # nothing wiped


def layer_bytes(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for t, data in entries:
            t.size = len(data) if t.isfile() else 0
            tar.addfile(t, io.BytesIO(data) if t.isfile() else None)
    return buf.getvalue()


def test_hostile_whiteouts_from_a_registry_are_refused_and_leave_nothing(oenv, oci_registry, tmp_path):
    env = oenv
    base = layer_bytes(
        [
            (ti("etc", tarfile.DIRTYPE), b""),
            (ti("etc/os-release"), b"ID=x\n"),
            (ti("opt", tarfile.DIRTYPE), b""),
            (ti("opt/old"), b"old"),
        ]
    )
    for i, name in enumerate([".wh...", ".wh..", ".wh.", "etc/.wh..."]):
        pushed = push_layers(oci_registry, "banger/whiteout", f"w{i}", [base, layer_bytes([(ti(name), b"")])], tmp_path / f"w{i}")
        r = env.run("image", "pull", pushed["ref"], "--name", f"w{i}", timeout=300)
        assert r.returncode == 1, r.stderr
        assert f"layer entry {name!r}: a whiteout of" in r.stderr and "names no entry of its directory" in r.stderr, r.stderr
        assert "FileNotFoundError" not in r.stderr and "Traceback" not in r.stderr
        assert f"w{i}" not in images(env)
        idir = env.state_dir / "images"
        assert not idir.exists() or not list(idir.iterdir()), list(idir.iterdir())
        scratch = env.root / "cache" / "scratch"  # where the layers were unpacked
        assert not scratch.exists() or not list(scratch.iterdir()), list(scratch.iterdir())
    # the opaque marker still works, and a plain whiteout too
    ok = push_layers(
        oci_registry,
        "banger/whiteout",
        "ok",
        [
            base,
            layer_bytes([(ti("opt/.wh..wh..opq"), b""), (ti("opt/new"), b"new"), (ti("etc/.wh.os-release"), b"")]),
        ],
        tmp_path / "ok",
    )
    env.run("image", "pull", ok["ref"], "--name", "wok", "--size", "64M", timeout=300, check=True)
    assert sorted(p.name for p in (env.state_dir / "images" / "wok").iterdir()) == ["layers.json", "rootfs.ext4"]
    assert list((env.root / "cache" / "scratch").iterdir()) == []
    rootfs = Path(images(env)["wok"]["rootfs"])
    assert debugfs(rootfs, "cat /opt/new").strip() == "new"
    assert "File not found" in debugfs(rootfs, "stat /opt/old") and "File not found" in debugfs(rootfs, "stat /etc/os-release")


# --- against a real registry -------------------------------------------------------------


@pytest.mark.slow
def test_pull_flatten_boot(oenv, oci_test_image):
    env = oenv
    ref = oci_test_image["ref"]
    r = env.run("image", "pull", ref, timeout=300, check=True)
    assert "image busybox-1:" in r.stdout
    img = images(env)["busybox-1"]
    assert img["managed"] and img["kernel_ref"] == "debian-cloud" and img["source"] == f"{ref}#{oci_test_image['digest']}"
    rootfs = Path(img["rootfs"])
    assert rootfs.stat().st_size >= 1024 * 1024 * 1024  # max(tree x 1.5, 1 GiB)
    for p in oci_test_image["expect_present"]:
        assert "File not found" not in debugfs(rootfs, f"stat {p}"), p
    for p in oci_test_image["expect_absent"]:
        assert "File not found" in debugfs(rootfs, f"stat {p}"), p
    assert debugfs(rootfs, "cat /etc/layer2").strip() == "2"
    assert "User:     0   Group:     0" in debugfs(rootfs, "stat /etc/os-release")
    assert "File not found" not in debugfs(rootfs, f"stat {oci.INIT_PATH}")
    env.run("vm", "create", "--name", "ocivm", "--image", "busybox-1", "--vcpu", "1", "--memory", "256M", timeout=300, check=True)
    text = wait_for(
        lambda: (t := env.run("vm", "logs", "ocivm", "-n", "0").stdout) and oci_test_image["boot_marker"] in t and t,
        timeout=180,
        interval=0.5,
    )
    assert "banger-init: image booted" in text and f"init={oci.INIT_PATH}" in text
    env.run("vm", "delete", "ocivm", "--force", check=True)
    r = env.run("image", "pull", ref)
    assert r.returncode == 1 and "image 'busybox-1' already exists" in r.stderr


def test_zstd_layers_index_and_names(oenv, oci_registry, tmp_path):
    env = oenv
    z = push_test_image(oci_registry, repo="banger/zbox", tag="z", workdir=tmp_path / "z", compression="mixed")
    env.run("image", "pull", z["ref"], "--name", "zb", "--size", "300M", timeout=300, check=True)
    img = images(env)["zb"]
    assert Path(img["rootfs"]).stat().st_size == 300 * 1024 * 1024
    assert debugfs(Path(img["rootfs"]), "cat /etc/layer2").strip() == "2"
    idx = push_multiarch_index(oci_registry, repo="banger/multi", workdir=tmp_path / "m")
    env.run("image", "pull", idx["ref"], "--name", "multi", timeout=300, check=True)
    assert images(env)["multi"]["source"].startswith(idx["ref"] + "#sha256:")
    assert images(env)["multi"]["source"] != f"{idx['ref']}#{idx['digest']}"  # resolved to the amd64 manifest


def test_anonymous_token_auth(oenv, oci_token_registry, tmp_path):
    pushed = push_test_image(oci_token_registry, repo="banger/tok", tag="t", workdir=tmp_path / "t")
    before = len(oci_token_registry.token_requests)
    oenv.run("image", "pull", pushed["ref"], "--name", "tok", timeout=300, check=True)
    mine = oci_token_registry.token_requests[before:]
    assert mine and any("repository:banger/tok:pull" in json.dumps(r) for r in mine), mine


def test_bad_refs_leave_nothing(oenv, oci_registry, oci_test_image):
    env = oenv
    repo = oci_test_image["ref"].rsplit(":", 1)[0]
    for ref, msg in [
        (f"{repo}:nope", "not found"),
        (f"{repo}@sha256:{'0' * 64}", "not found"),
        ("127.0.0.1:1/none/here:1", "registry 127.0.0.1:1"),
        ("127.0.0.1:5000/UPPER:1", "invalid repository"),
    ]:
        r = env.run("image", "pull", ref, "--name", "never", timeout=120)
        assert r.returncode == 1 and msg in r.stderr, (ref, r.stderr)
    assert "never" not in images(env)
    idir = env.state_dir / "images"
    assert not idir.exists() or not [p for p in idir.iterdir() if p.name.startswith(".")]


def test_layer_cache_holds_only_what_pulled_images_use(oenv, oci_registry, oci_test_image, tmp_path):
    env = oenv
    blobs = env.root / "cache" / "blobs"
    want = {oci.blob_name(layer["digest"]) for layer in oci_test_image["layers"]}
    r = env.run("image", "pull", oci_test_image["ref"], "--name", "first", timeout=300, check=True)
    # not a terminal: one line per layer download, with its size
    assert len([ln for ln in r.stderr.splitlines() if " download first layer " in ln and " MB)" in ln]) == 2, r.stderr
    assert {p.name for p in blobs.iterdir()} == want
    r = env.run("image", "pull", oci_test_image["ref"], "--name", "second", timeout=300, check=True)
    assert r.stderr.count(", cached)") == 2 and " download " not in r.stderr, r.stderr
    # a failed pull's layers do not stay: an image whose config can't be used is refused after download
    other = push_test_image(oci_registry, repo="banger/other", tag="o", workdir=tmp_path / "o", compression="zstd")
    r = env.run("image", "pull", other["ref"], "--name", "other", "--size", "1M", timeout=300)
    assert r.returncode == 1 and "--size 1 MiB is too small" in r.stderr, r.stderr
    assert {p.name for p in blobs.iterdir()} == want
    # deleting one user of the layers keeps them; deleting the last removes them
    env.run("image", "delete", "first", check=True)
    assert {p.name for p in blobs.iterdir()} == want
    env.run("image", "delete", "second", check=True)
    assert list(blobs.iterdir()) == []


def test_cancelled_blob_download_leaves_no_part_file(oci_registry, oci_test_image, tmp_path):
    import threading

    from banger_core.errors import ErrorCode

    reg = oci.Registry(oci.parse_ref(oci_test_image["ref"]))
    digest = oci_test_image["layers"][0]["digest"]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(BangerError) as e:
        reg.blob(digest, tmp_path / "layer", cancel=cancel)
    assert e.value.code == ErrorCode.CANCELLED and "cancelled" in e.value.message
    assert list(tmp_path.iterdir()) == []
    seen: list[int] = []
    reg.blob(digest, tmp_path / "layer", on_bytes=seen.append)
    assert seen and seen[-1] == (tmp_path / "layer").stat().st_size == oci_test_image["layers"][0]["size"]


def test_oci_rootfs_goes_through_the_rootfs_checks(oenv, oci_test_image):
    """An OCI pull is held to [images] max_rootfs_size like every other source, and
    what it publishes is a checked ext4 (images.publish_rootfs)."""
    env = oenv
    env.write_config("[vmm]\naccel = 'tcg'\n[images]\nmax_rootfs_size = 512\n")
    r = env.run("image", "pull", oci_test_image["ref"], "--name", "toobig", timeout=300)  # default size: 1 GiB
    assert r.returncode == 1 and "a 1024 MiB rootfs is over [images] max_rootfs_size (512 MiB)" in r.stderr, r.stderr
    assert "toobig" not in images(env)
    idir = env.state_dir / "images"
    assert not idir.exists() or not list(idir.iterdir()), list(idir.iterdir())
    env.run("image", "pull", oci_test_image["ref"], "--name", "fits", "--size", "300M", timeout=300, check=True)
    assert sorted(p.name for p in idir.iterdir()) == ["fits"]
    assert sorted(p.name for p in (idir / "fits").iterdir()) == ["layers.json", "rootfs.ext4"]
    subprocess.run(["e2fsck", "-fn", images(env)["fits"]["rootfs"]], check=True, capture_output=True)
