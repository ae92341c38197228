"""What every host-side artifact recipe shares: running tools, Debian packages,
atomic installs, a build lock, and the vmlinux inside a bzImage.

Standard library plus Debian's own tools (apt-get, dpkg-deb) only.
"""

from __future__ import annotations

import collections
import fcntl
import lzma
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from banger_core.errors import raise_if_cancelled
from banger_core.vmm.base import ELF_MAGIC

Log = Callable[[str], Any]
Work = Callable[[int, int], None]  # a long build's progress: (steps done, expected steps)

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


class ArtifactBuildError(RuntimeError):
    """Building a guest artifact failed; the message says which step and why."""


# A cancelled build raises banger_core.errors.Cancelled (what it started is stopped first).


def run(
    args: Sequence[str],
    log: Log,
    *,
    check: bool = True,
    cwd: Path | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess[Any]:
    """Run a command, logging it and (on failure) its exit status and stderr."""
    log(f"$ {' '.join(args)}")
    proc = subprocess.run(list(args), capture_output=True, text=text, cwd=cwd, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        stderr = proc.stderr if text else proc.stderr.decode(errors="replace")
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        if check:
            raise ArtifactBuildError(f"{args[0]} exited {proc.returncode}: {tail}")
        log(f"  exit {proc.returncode}: {tail}")
    return proc


def run_long(
    args: Sequence[str],
    log: Log,
    *,
    cwd: Path | None = None,
    cancel: threading.Event | None = None,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run a long command (a kernel build), streaming its output lines to ``on_line``.

    The command runs in its own process group: when ``cancel`` is set, the whole
    group (make and every compiler it started) is terminated, then killed, and
    errors.Cancelled is raised. A failure raises with the last lines of its output.
    """
    log(f"$ {' '.join(args)}")
    p = subprocess.Popen(
        list(args),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    tail: collections.deque[str] = collections.deque(maxlen=15)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            if cancel is not None and cancel.is_set():
                _kill_group(p)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert p.stdout is not None
        for line in p.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if on_line is not None:
                on_line(line)
        p.wait()
    finally:
        stop.set()
        watcher.join()
        if p.poll() is None:
            _kill_group(p)
    raise_if_cancelled(cancel, args[0])
    if p.returncode != 0:
        errors = [line for line in tail if "error" in line.lower()] or list(tail)
        raise ArtifactBuildError(f"{args[0]} exited {p.returncode}: " + "\n".join(errors[-8:]))


def _kill_group(p: subprocess.Popen[str]) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if p.poll() is not None:
                return
            time.sleep(0.05)


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mountinfo)."""
    root = Path(os.path.realpath(path))
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            # the kernel escapes space, tab, newline and backslash as \ooo; the rest is as is
            point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
            if point == root or root in point.parents:
                found.append(point)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path) -> None:
    """Remove a build's scratch tree, first detaching anything still mounted inside it
    (a chroot builder killed mid-way leaves /proc, /sys or /dev mounts behind, and
    rmtree would walk into them). Raises if a mount cannot be detached: deleting
    through it could delete the host's files."""
    for point in mounts_under(path):
        subprocess.run(["umount", "--lazy", str(point)], capture_output=True, check=False)
    left = mounts_under(path)
    if left:
        raise ArtifactBuildError(f"cannot unmount {', '.join(map(str, left))}: {path} left in place")
    shutil.rmtree(path, ignore_errors=True)


def download_deb(package: str, version: str | None, cache: Path, log: Log) -> Path:
    """The package's .deb in ``cache``, downloaded with apt-get unless already there."""
    cache.mkdir(parents=True, exist_ok=True)
    # apt-get download names files NAME_VERSION_ARCH.deb with ':' spelled %3a.
    stem = f"{package}_{version.replace(':', '%3a')}_" if version else f"{package}_"
    cached = sorted(cache.glob(f"{stem}*.deb"), key=lambda p: p.stat().st_mtime)
    if cached:
        log(f"using cached {cached[-1].name}")
        return cached[-1]
    spec = f"{package}={version}" if version else package
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        args = ["apt-get", "download", spec]
        if os.geteuid() == 0:
            # apt's _apt sandbox user cannot write into root's cache directory.
            args[1:1] = ["-o", "APT::Sandbox::User=root"]
        try:
            run(args, log, cwd=tmp)
        except ArtifactBuildError:
            log(f"apt-get download {spec} failed: refreshing package lists once")
            run(["apt-get", "update"], log)
            run(args, log, cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise ArtifactBuildError(f"apt-get download {spec} produced {len(debs)} .deb files")
        final = cache / debs[0].name
        debs[0].rename(final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True).stdout.strip()


def install_file(data: bytes, path: Path) -> None:
    """Write atomically: readers never see a half-written kernel or initrd."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def install_copy(src: Path, path: Path) -> None:
    """Copy a (large) file into place atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, path)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- ext4


INODE_BYTES = 256  # mkfs.ext4's default inode size
BLOCK = 4096


def tree_needs(tree: Path) -> tuple[int, int]:
    """(bytes, entries) ``tree`` needs in an ext4: each file's data in whole 4 KiB
    blocks (or what it occupies here, if more), a block per directory, and one inode
    per entry. Small files cost a block each however small they are."""
    data, entries = 0, 0
    for dirpath, _dirs, files in os.walk(tree):
        entries += 1
        data += BLOCK
        for f in files:
            entries += 1
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            data += max(-(-st.st_size // BLOCK) * BLOCK, st.st_blocks * 512)
    return data, entries


def ext4_from_tree(
    tree: Path,
    out: Path,
    size_mib: int | None = None,
    label: str = "banger-root",
    max_mib: int | None = None,
    what: str = "the image",
) -> dict[str, int]:
    """Make ``out`` an ext4 holding ``tree`` (mkfs.ext4 -d). The default size is
    max(tree x 1.5 + its inode tables, 1 GiB), the tree counted in whole blocks; the
    inode count is what the tree has x 1.5 (+4096), never fewer than mkfs's default
    ratio gives (mkfs's one-inode-per-16-KiB alone runs out on a tree of small files).
    Refused when ``size_mib`` is too small for the tree or over ``max_mib``. A temp
    file until complete. Returns {"size_mib", "tree_mib", "inodes"}."""
    from banger_core import proc
    from banger_core.errors import BangerError, ErrorCode

    data, entries = tree_needs(tree)
    used = data // (1024 * 1024)
    inodes = int(entries * 1.5) + 4096
    tables = inodes * INODE_BYTES // (1024 * 1024)
    size = size_mib or max(int(used * 1.5) + tables + 16, 1024)
    if size < used + tables + 16:
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"--size {size} MiB is too small for the {used} MiB image ({entries} files, {tables} MiB of inode tables)",
        )
    if max_mib is not None and size > max_mib:  # refused before it is made (the publish step checks again)
        raise BangerError(ErrorCode.BAD_REQUEST, f"{what}: a {size} MiB rootfs is over [images] max_rootfs_size ({max_mib} MiB)")
    inodes = max(inodes, size * 1024 * 1024 // 16384)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.truncate(size * 1024 * 1024)
    try:
        proc.run(
            ["mkfs.ext4", "-q", "-F", "-L", label, "-N", str(inodes), "-I", str(INODE_BYTES), "-d", tree, tmp],
            timeout=1800,
            what="mkfs.ext4 -d",
        )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"size_mib": size, "tree_mib": used, "inodes": inodes}


# --------------------------------------------------------------------------- vmlinux


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside an x86 bzImage.

    The boot protocol (2.08+) header says where the compressed payload lies:
    ``payload_offset``/``payload_length`` relative to the protected-mode code that
    follows the ``setup_sects`` real-mode sectors. Firecracker boots only an ELF
    vmlinux, and so does QEMU's PVH path; distributions ship only the bzImage.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ArtifactBuildError("not a bzImage (no 'HdrS' boot header)")
    version = struct.unpack_from("<H", bzimage, 0x206)[0]
    if version < 0x208:
        raise ArtifactBuildError(f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields (need 2.08+)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if len(payload) != length:
        raise ArtifactBuildError("bzImage is truncated: its payload runs past the end of the file")
    elf = _decompress(payload)
    if elf[:4] != ELF_MAGIC:
        raise ArtifactBuildError("the bzImage payload does not decompress to an ELF image")
    return elf


def _decompress(payload: bytes) -> bytes:
    if payload.startswith(b"\x1f\x8b"):
        # one member only: the kernel appends its uncompressed size after the stream
        return zlib.decompressobj(wbits=31).decompress(payload)
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    if payload.startswith(LZ4_LEGACY_MAGIC):
        return _lz4_legacy(payload)
    raise ArtifactBuildError(
        f"bzImage payload compressed with an unsupported method (magic {payload[:4].hex()}); "
        "gzip, xz, lzma, lz4 and zstd are supported"
    )


def _lz4_legacy(payload: bytes) -> bytes:
    """lz4's legacy frame, as the kernel's build writes it: the magic, then blocks of
    (u32 compressed size, data) that each expand to at most 8 MiB, then the kernel's
    own u32 of the total uncompressed size."""
    import lz4.block

    expected = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    body, pos, out = payload[:-4], len(LZ4_LEGACY_MAGIC), bytearray()
    while pos + 4 <= len(body):
        size = struct.unpack_from("<I", body, pos)[0]
        if size == struct.unpack("<I", LZ4_LEGACY_MAGIC)[0]:  # a concatenated stream
            pos += 4
            continue
        block = body[pos + 4 : pos + 4 + size]
        if len(block) != size:
            raise ArtifactBuildError("bzImage lz4 payload is truncated")
        out += lz4.block.decompress(block, uncompressed_size=8 << 20)
        pos += 4 + size
    if len(out) != expected:
        raise ArtifactBuildError(f"bzImage lz4 payload expanded to {len(out)} bytes, its trailer says {expected}")
    return bytes(out)
