"""Build banger's microVM kernel on the host from Debian's ``linux-source-6.1``.

The source package's tarball is configured with banger's own fragment
(``microvm-6.1.config`` beside this file, applied with ``KCONFIG_ALLCONFIG`` on top
of ``allnoconfig``) and built into an ELF ``vmlinux`` with everything built in:

    dest/vmlinux          the kernel (boots through PVH: QEMU -M microvm, Firecracker)
    dest/config           the resolved .config
    dest/manifest.json    what was built (paths relative to dest)

Minutes of compiling (about ten on 2 cores), so it is never a first-run default;
built once per host and cached. Needs gcc, make, bc, bison, flex and libelf's
headers (``apt install build-essential bc bison flex libelf-dev``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from banger_core import fsutil, proc
from banger_core.fsutil import locked
from banger_debian.common import (
    ArtifactBuildError,
    Log,
    Work,
    deb_field,
    download_deb,
)

SOURCE_PACKAGE = "linux-source-6.1"
FRAGMENT = "microvm-6.1.config"
# Bump when the build steps or the layout change; a change to the fragment is
# noticed by its hash.
RECIPE = 1
# Compile steps (CC/AS/LD/AR lines) of a build with this fragment, counted on one: the
# denominator of the progress bar, which stops short of 100% if a build needs more.
EXPECTED_STEPS = 1800

# tool -> the Debian package that provides it
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "bc": "bc", "bison": "bison", "flex": "flex", "ld": "binutils"}
LIBELF_HEADER = Path("/usr/include/gelf.h")

_OPTION = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


def fragment_text() -> str:
    return resources.files("banger_debian").joinpath(FRAGMENT).read_text()


def recipe_id() -> str:
    """What identifies a build of this recipe: its revision and its fragment's hash."""
    digest = hashlib.sha256(fragment_text().encode()).hexdigest()[:12]
    return f"{RECIPE}.{digest}"


def check_build_tools() -> None:
    """Raise naming the apt packages to install when a build tool is missing."""
    missing = sorted({pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None})
    if not LIBELF_HEADER.is_file():
        missing.append("libelf-dev")
    if missing:
        raise ArtifactBuildError(
            "building the microVM kernel needs " + ", ".join(missing) + f" (apt install {' '.join(missing)})"
        )


def build_microvm_kernel(
    dest: Path,
    cache: Path | None = None,
    log: Log = print,
    *,
    jobs: int | None = None,
    cancel: threading.Event | None = None,
    work: Work | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the microVM kernel into ``dest``; return its manifest with
    absolute paths (``kernel``, ``vmlinux``, ``config``) and ``version``,
    ``package``, ``package_version``, ``recipe``.

    Idempotent and safe across processes (a lock file in ``dest``): a manifest from
    the same recipe and fragment is returned without work. The source tree is
    unpacked in a temporary directory inside ``dest`` and removed afterwards, built
    or not; a cancelled build stops make and every compiler it started.
    """
    dest = Path(dest).resolve()
    cache = Path(cache).resolve() if cache is not None else dest / "debs"
    dest.mkdir(parents=True, exist_ok=True)
    with locked(dest / ".lock"):
        existing = load_manifest(dest)
        if existing is not None:
            return existing
        check_build_tools()
        deb = download_deb(SOURCE_PACKAGE, None, cache, log)
        scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=dest))
        try:
            tree = unpack_source(deb, scratch, log)
            configure(tree, scratch / FRAGMENT, log)
            kver = compile_vmlinux(tree, log, jobs=jobs, cancel=cancel, work=work)
            fsutil.atomic_copy(tree / "vmlinux", dest / "vmlinux")
            fsutil.atomic_copy(tree / ".config", dest / "config")
            manifest = {
                "version": kver,
                "package": deb_field(deb, "Package"),
                "package_version": deb_field(deb, "Version"),
                "kernel": "vmlinux",
                "vmlinux": "vmlinux",
                "config": "config",
                "recipe": recipe_id(),
            }
            fsutil.atomic_write(dest / "manifest.json", json.dumps(manifest, indent=2) + "\n")
            log(f"kernel {kver} ready in {dest}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    manifest_abs = load_manifest(dest)
    if manifest_abs is None:  # pragma: no cover - written just above
        raise ArtifactBuildError(f"{dest}/manifest.json is missing after a build")
    return manifest_abs


def load_manifest(dest: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((dest / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("recipe") != recipe_id():
        return None
    manifest = dict(raw)
    for key in ("kernel", "vmlinux", "config"):
        rel = raw.get(key)
        if not isinstance(rel, str) or not (dest / rel).is_file():
            return None
        manifest[key] = str(dest / rel)
    return manifest


def unpack_source(deb: Path, into: Path, log: Log) -> Path:
    """Unpack the kernel tarball that linux-source-X ships in /usr/src; return the tree."""
    member = f"./usr/src/{SOURCE_PACKAGE}.tar.xz"
    log(f"unpacking {deb.name}")
    t0 = time.monotonic()
    # dpkg-deb streams the package's data tar; tar pulls the source tarball out of it
    # and a second tar unpacks that: no 140 MB intermediate file.
    script = f'dpkg-deb --fsys-tarfile "$1" | tar -xO "{member}" | tar -xJ -C "$2"'
    proc.run(["sh", "-ec", script, "sh", deb, into], timeout=None, echo=log)
    trees = [p for p in into.iterdir() if p.is_dir() and (p / "Makefile").is_file()]
    if len(trees) != 1:
        raise ArtifactBuildError(f"{deb.name}: expected one source tree in {member}, found {len(trees)}")
    log(f"unpacked {trees[0].name} in {time.monotonic() - t0:.0f}s")
    return trees[0]


def configure(tree: Path, fragment_path: Path, log: Log, text: str | None = None) -> dict[str, str]:
    """Apply banger's fragment (or ``text``) on top of allnoconfig; return the resolved options.

    Raises when an option of the fragment did not survive (its dependencies are not
    met in this kernel version): a silently missing virtio or ext4 would only show
    up as a guest that cannot find its root disk.
    """
    text = fragment_text() if text is None else text
    fragment_path.write_text(text)
    proc.run(
        ["make", "-C", tree, "-s", "ARCH=x86_64", f"KCONFIG_ALLCONFIG={fragment_path}", "allnoconfig"], timeout=None, echo=log
    )
    resolved = parse_config((tree / ".config").read_text())
    wanted = parse_config(text)
    lost = [f"{k}={v} (got {resolved.get(k, 'n')})" for k, v in wanted.items() if resolved.get(k, "n") != v]
    if lost:
        raise ArtifactBuildError("the kernel config dropped options of banger's fragment: " + ", ".join(lost))
    log(f"configured: {sum(v == 'y' for v in resolved.values())} options built in, no modules")
    return resolved


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value for a .config or a fragment ("n" for '# CONFIG_X is not set')."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _OPTION.match(line):
            options[m[1]] = m[2]
        elif m := _UNSET.match(line):
            options[m[1]] = "n"
    return options


def compile_vmlinux(
    tree: Path,
    log: Log,
    *,
    jobs: int | None = None,
    cancel: threading.Event | None = None,
    work: Work | None = None,
) -> str:
    """``make vmlinux``; a progress line every 30 s and a ``work`` call per compile
    step; return the kernel release."""
    jobs = jobs or os.cpu_count() or 1
    t0 = time.monotonic()
    state = {"objects": 0, "said": t0}

    def on_line(line: str) -> None:
        if line.lstrip().startswith(("CC ", "AS ", "LD ", "AR ")):
            state["objects"] += 1
            if work is not None:
                work(min(int(state["objects"]), EXPECTED_STEPS - 1), EXPECTED_STEPS)
        now = time.monotonic()
        if now - state["said"] >= 30:
            state["said"] = now
            log(f"compiling: {state['objects']} of ~{EXPECTED_STEPS} steps after {now - t0:.0f}s")

    log(f"compiling vmlinux with {jobs} jobs (about ten minutes on 2 cores)")
    proc.run_long(["make", "-C", tree, "ARCH=x86_64", f"-j{jobs}", "vmlinux"], echo=log, cancel=cancel, on_line=on_line)
    kver = proc.run(["make", "-C", tree, "-s", "ARCH=x86_64", "kernelrelease"], timeout=None, echo=log, text=True).stdout.strip()
    if work is not None:
        work(EXPECTED_STEPS, EXPECTED_STEPS)
    log(f"compiled in {state['objects']} steps, {time.monotonic() - t0:.0f}s")
    return kver
