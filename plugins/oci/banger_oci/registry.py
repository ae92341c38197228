"""Pull an OCI/Docker image from a registry and turn it into a bootable ext4 rootfs.

Registry protocol (distribution spec): anonymous bearer-token auth, manifest lists /
OCI indexes resolved to linux/amd64, every blob verified against its digest. Layers
(gzip, zstd or plain tar) are applied in order with whiteouts (``.wh.NAME``) and opaque
directories (``.wh..wh..opq``); entry names that are absolute, contain '..' or control
characters, and whiteouts of '', '.' or '..' are refused, and paths are resolved inside the tree (a symlink in the image
never leads outside it). The tree becomes an ext4 with ``mkfs.ext4 -d`` (owned as in
the image, i.e. by root), sized max(tree x 1.5, 1 GiB) unless a size is given, after
banger's first-boot init is put in.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import ipaddress
import json
import os
import re
import shutil
import stat
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import zstandard

from banger_core import fsutil
from banger_core.errors import BangerError, ErrorCode, raise_if_cancelled
from banger_core.sources import GUEST_BOOT_DIR, GuestPayload

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
INIT_PATH = "/usr/local/libexec/banger/init"
Log = Callable[[str], Any]
Download = Callable[..., None]  # (label, bytes so far, total=bytes or None)


def bad(msg: str) -> BangerError:
    return BangerError(ErrorCode.BAD_REQUEST, msg)


@dataclass
class Ref:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def friendly_name(self) -> str:
        base = self.repository.rsplit("/", 1)[-1]
        suffix = self.tag if self.tag and self.tag != "latest" else (self.digest or "")[7:19]
        name = f"{base}-{suffix}" if suffix else base
        return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")[:63] or "image"


def parse_ref(text: str) -> Ref:
    """``[REGISTRY/]REPO[:TAG][@sha256:DIGEST]``; no registry means Docker Hub."""
    rest, at, after = text.partition("@")
    digest = after if at else None
    if digest is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise bad(f"image reference {text!r}: digest must be sha256:<64 hex>")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
    else:
        registry, path = "registry-1.docker.io", rest
        if "/" not in path:
            path = f"library/{path}"
    tag = None
    if ":" in path.rsplit("/", 1)[-1]:
        path, tag = path.rsplit(":", 1)
    if not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", path):
        raise bad(f"image reference {text!r}: invalid repository {path!r}")
    return Ref(registry, path, tag or (None if digest else "latest"), digest)


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


class Registry:
    def __init__(self, ref: Ref, timeout: float = 60) -> None:
        self.ref = ref
        self.base = f"{'http' if _is_loopback(ref.registry) else 'https'}://{ref.registry}/v2/{ref.repository}"
        self.token: str | None = None
        self.timeout = timeout

    def _open(self, url: str, accept: str | None = None) -> Any:
        for attempt in range(2):
            req = urllib.request.Request(url)
            if accept:
                req.add_header("Accept", accept)
            if self.token:
                req.add_header("Authorization", f"Bearer {self.token}")
            try:
                return urllib.request.urlopen(req, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and attempt == 0 and "bearer" in exc.headers.get("WWW-Authenticate", "").lower():
                    self._get_token(exc.headers["WWW-Authenticate"])
                    continue
                if exc.code == 404:
                    raise BangerError(
                        ErrorCode.NOT_FOUND, f"{self.ref.registry}/{self.ref.repository}: {url.rsplit('/', 2)[-2:]} not found"
                    ) from None
                raise BangerError(
                    ErrorCode.OPERATION_FAILED, f"registry {self.ref.registry}: HTTP {exc.code} for {url}"
                ) from None
            except (urllib.error.URLError, OSError) as exc:
                raise BangerError(ErrorCode.OPERATION_FAILED, f"registry {self.ref.registry}: {exc}") from None
        raise BangerError(ErrorCode.UNAUTHORIZED, f"registry {self.ref.registry} refused anonymous access")

    def _get_token(self, challenge: str) -> None:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", None)
        if not realm:
            raise BangerError(ErrorCode.UNAUTHORIZED, f"registry {self.ref.registry}: bad auth challenge")
        params.setdefault("scope", f"repository:{self.ref.repository}:pull")
        with urllib.request.urlopen(f"{realm}?{urllib.parse.urlencode(params)}", timeout=self.timeout) as r:
            data = json.loads(r.read())
        self.token = data.get("token") or data.get("access_token")

    def manifest(self, reference: str) -> tuple[str, dict[str, Any], str]:
        with self._open(f"{self.base}/manifests/{reference}", ACCEPT) as r:
            body = r.read()
            media = (r.headers.get("Content-Type") or "").split(";")[0]
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise bad(f"manifest digest {digest} does not match the requested {reference}")
        doc = json.loads(body)
        return doc.get("mediaType") or media, doc, digest

    def blob(
        self, digest: str, dest: Path, on_bytes: Callable[[int], None] | None = None, cancel: threading.Event | None = None
    ) -> Path:
        """Download a blob to ``dest`` (skipped if already there, verified either way;
        a reused blob's mtime is refreshed, which keeps it from being pruned while in
        use). ``on_bytes`` hears the running byte count; ``cancel`` stops the download.
        Nothing partial is left behind."""
        if dest.exists() and _sha256_file(dest) == digest:
            os.utime(dest)
            return dest
        h = hashlib.sha256()
        got = 0
        # a temp name of its own: two pulls sharing a layer download it side by side
        with fsutil.atomic_file(dest) as tmp:
            with self._open(f"{self.base}/blobs/{digest}") as r, open(tmp, "wb") as out:
                while chunk := r.read(1 << 20):
                    raise_if_cancelled(cancel, f"pulling {self.ref.registry}/{self.ref.repository}")
                    h.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
                    if on_bytes is not None:
                        on_bytes(got)
            if "sha256:" + h.hexdigest() != digest:
                raise bad(f"blob {digest}: content hashes to sha256:{h.hexdigest()}")
        return dest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def resolve_manifest(reg: Registry) -> tuple[dict[str, Any], str]:
    media, doc, digest = reg.manifest(reg.ref.reference)
    if media in INDEX_TYPES or "manifests" in doc:
        for m in doc.get("manifests", []):
            p = m.get("platform", {})
            if p.get("os") == "linux" and p.get("architecture") == "amd64":
                media, doc, digest = reg.manifest(m["digest"])
                break
        else:
            raise bad(f"{reg.ref.registry}/{reg.ref.repository}: no linux/amd64 image in the index")
    if "layers" not in doc:
        raise bad(f"unsupported manifest type {media!r}")
    return doc, digest


# --- flattening ---------------------------------------------------------------------------
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _clean_name(name: str) -> PurePosixPath:
    if _BAD_CHARS.search(name):
        raise bad(f"layer entry {name!r}: control characters in names are not allowed")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise bad(f"layer entry {name!r}: absolute or '..' paths are not allowed")
    parts = [x for x in p.parts if x not in (".", "")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def resolve_in(root: Path, rel: PurePosixPath, follow_last: bool = False) -> Path:
    """Host path of guest path ``rel``, following the guest's symlinks inside ``root``
    (an absolute link target means the tree's root), never leaving it."""
    parts = list(rel.parts)
    cur = root
    hops = 0
    i = 0
    while i < len(parts):
        part = parts[i]
        i += 1
        if part == "..":
            cur = cur.parent if cur != root else root
            continue
        nxt = cur / part
        last = i == len(parts)
        if nxt.is_symlink() and (not last or follow_last):
            hops += 1
            if hops > 40:
                raise bad(f"layer entry {rel}: too many symlinks")
            target = PurePosixPath(os.readlink(nxt))
            if target.is_absolute():
                cur = root
                target = PurePosixPath(*target.parts[1:])
            parts = [x for x in target.parts if x not in ("", ".")] + parts[i:]
            i = 0
            continue
        cur = nxt
    if cur != root and root not in cur.parents:
        raise bad(f"layer entry {rel}: resolves outside the image")
    return cur


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _open_layer(path: Path) -> Any:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    return open(path, "rb")


def apply_layer(layer: Path, root: Path) -> None:
    written: set[Path] = set()
    with _open_layer(layer) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for m in tar:
            rel = _clean_name(m.name)
            if str(rel) == ".":
                continue
            base = rel.name
            parent = resolve_in(root, rel.parent, follow_last=True)
            if base == ".wh..wh..opq":
                if parent.is_dir():
                    for child in list(parent.iterdir()):
                        if child not in written:
                            _remove(child)
                continue
            if base.startswith(".wh."):
                target = base[4:]
                if target in ("", ".", "..") or "/" in target:  # would remove the directory itself, or its parent
                    raise bad(f"layer entry {m.name!r}: a whiteout of {target!r} names no entry of its directory")
                victim = parent / target
                if victim.exists() or victim.is_symlink():
                    _remove(victim)
                continue
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk() or m.ischr() or m.isblk() or m.isfifo()):
                continue
            dest = parent / base
            if (dest.exists() or dest.is_symlink()) and not (m.isdir() and dest.is_dir() and not dest.is_symlink()):
                _remove(dest)
            parent.mkdir(parents=True, exist_ok=True)
            if m.islnk():
                src = resolve_in(root, _clean_name(m.linkname))
                os.link(src, dest)
            elif m.isdir():
                dest.mkdir(exist_ok=True)
                os.chmod(dest, m.mode & 0o7777)
                os.lchown(dest, m.uid, m.gid)
            elif m.issym():
                os.symlink(m.linkname, dest)
                os.lchown(dest, m.uid, m.gid)
            elif m.isfile():
                data = tar.extractfile(m)
                assert data is not None  # a regular file member always has data
                with open(dest, "wb") as out:
                    shutil.copyfileobj(data, out)
                os.lchown(dest, m.uid, m.gid)
                os.chmod(dest, m.mode & 0o7777)
            else:  # device nodes and FIFOs in the guest's /dev and friends
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
                os.mknod(dest, kind | (m.mode & 0o777), os.makedev(m.devmajor, m.devminor))
                os.lchown(dest, m.uid, m.gid)
            written.add(dest)


INIT_SCRIPT = """#!{busybox} sh
# banger's first-boot init: mount the API filesystems, then hand over to systemd if
# the image has it, else load what udev would have (the agent's port driver), start
# what there is (boot.d, sshd) and keep PID 1 alive.
B={busybox}
$B mkdir -p /proc /sys /dev /run /tmp
$B mount -t proc proc /proc 2>/dev/null
$B mount -t sysfs sys /sys 2>/dev/null
$B mount -t devtmpfs dev /dev 2>/dev/null
$B mount -t tmpfs run /run 2>/dev/null
for s in /lib/systemd/systemd /usr/lib/systemd/systemd; do
  [ -x "$s" ] && exec "$s"
done
echo "banger-init: image booted ($($B cat /etc/os-release 2>/dev/null | $B grep '^ID=' ))" > /dev/console
# no udev here: load the agent's virtio-serial port driver where the kernel has it as a
# module and the image its modules (microvm-6.1 has it built in; then this does nothing)
$B modprobe -q virtio_console 2>/dev/null
for s in {boot_dir}/*; do [ -x "$s" ] && "$s" </dev/null >/dev/console 2>&1 & done
[ -x /sbin/init ] && [ "$($B readlink -f /sbin/init)" != "{init}" ] && exec /sbin/init
[ -x /usr/sbin/sshd ] && /usr/sbin/sshd
trap '$B sync; $B poweroff -f' INT TERM USR2
while :; do $B sleep 3600 & wait; done
"""


def inject_init(root: Path, busybox: Path) -> None:
    d = resolve_in(root, PurePosixPath(INIT_PATH.lstrip("/")).parent, follow_last=True)
    d.mkdir(parents=True, exist_ok=True)
    bb = d / "busybox"
    shutil.copy2(busybox, bb)
    os.chmod(bb, 0o755)
    init = d / "init"
    init.write_text(
        INIT_SCRIPT.format(busybox=str(PurePosixPath(INIT_PATH).parent / "busybox"), init=INIT_PATH, boot_dir=GUEST_BOOT_DIR)
    )
    os.chmod(init, 0o755)


def blob_name(digest: str) -> str:
    """The blob cache's file name for a layer."""
    return digest.replace(":", "-")


def pull_to_rootfs(
    ref_text: str,
    out: Path,
    work: Path,
    blobs: Path,
    busybox: Path,
    size_mib: int | None = None,
    log: Log = lambda _m: None,
    download: Download | None = None,
    cancel: threading.Event | None = None,
    max_mib: int | None = None,
    payload: GuestPayload | None = None,
) -> dict[str, Any]:
    """Registry -> layers -> tree -> ext4 at ``out``. ``work`` is scratch (removed after).
    ``download(label, bytes, total)`` hears each layer's download; ``cancel`` stops
    between chunks and layers. The result names the manifest ``digest`` and its
    ``layers`` (digests)."""
    ref = parse_ref(ref_text)
    reg = Registry(ref)
    manifest, digest = resolve_manifest(reg)
    blobs.mkdir(parents=True, exist_ok=True)
    tree = work / "tree"
    tree.mkdir(parents=True)
    layers = manifest["layers"]
    for i, layer in enumerate(layers):
        raise_if_cancelled(cancel, f"pulling {ref_text}")
        label = f"layer {i + 1}/{len(layers)} {layer['digest'][7:19]}"
        dest = blobs / blob_name(layer["digest"])
        on_bytes = None
        if download is not None and not dest.exists():  # the download reports itself
            on_bytes = functools.partial(download, label, total=layer.get("size"))
        else:
            log(f"{label} ({layer.get('size', 0) // 1024} KiB{', cached' if dest.exists() else ''})")
        path = reg.blob(layer["digest"], dest, on_bytes, cancel)
        apply_layer(path, tree)
    inject_init(tree, busybox)
    if payload is not None:
        payload.apply(tree)
    from banger_core.images import ext4_from_tree

    made = ext4_from_tree(tree, out, size_mib, max_mib=max_mib, what=ref_text)
    size, used = made["size_mib"], made["tree_mib"]
    return {
        "ref": ref_text,
        "digest": digest,
        "size_mib": size,
        "tree_mib": used,
        "name": ref.friendly_name(),
        "layers": [layer["digest"] for layer in layers],
    }
