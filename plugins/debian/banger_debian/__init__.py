"""banger's Debian source: the default image ``debian-bookworm`` and the kernels
``debian-cloud`` and ``microvm-6.1``, built on the host from Debian's packages
(mmdebstrap, apt, linux-source-6.1), as a plugin registering its source like any other.

What a build records (``recipe:NAME/REVISION``, plus the kernel modules an image
carries) is what banger recorded before the recipes left its core, so images and
kernels built then are judged fresh or stale exactly as before.

It also offers the ``busybox`` service: a static busybox other plugins put into what
they build (the OCI source's first-boot init), from the host or Debian's busybox-static.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from banger_core import hookimpl
from banger_core.context import CheckResult
from banger_core.errors import BangerError, Cancelled, ErrorCode
from banger_core.sources import Fetched, Kind, PullOptions, SourceContext, SourceJob

provides = ["busybox"]

KERNELS: dict[str, dict[str, str]] = {
    "debian-cloud": {
        "description": "Debian 12 cloud kernel with banger's initrd and its modules (bzImage for QEMU -M pc, ELF vmlinux "
        "beside it); built in seconds",
        "arch": "x86_64",
        "recipe": "debian-cloud-kernel",
    },
    "microvm-6.1": {
        "description": "Linux 6.1 from Debian's linux-source-6.1 with banger's microVM config: everything built in, ELF "
        "vmlinux for Firecracker and QEMU -M microvm; compiled on this host (~4-10 min), then cached",
        "arch": "x86_64",
        "recipe": "debian-source-microvm",
    },
}
IMAGES: dict[str, dict[str, str]] = {
    "debian-bookworm": {
        "description": "Debian 12 minbase: systemd, openssh-server, python3, git, iproute2, ca-certificates, curl",
        "distro": "debian",
        "arch": "x86_64",
        "kernel_ref": "debian-cloud",
        "recipe": "debian-bookworm",
    }
}


def _recipe_revision(recipe: str) -> str:
    if recipe == "debian-cloud-kernel":
        from banger_debian import debian_kernel

        return str(debian_kernel.RECIPE)
    if recipe == "debian-source-microvm":
        from banger_debian import microvm_kernel

        return microvm_kernel.recipe_id()
    from banger_debian import debian_image

    return str(debian_image.RECIPE)


@contextmanager
def _build_errors(kind: str, name: str) -> Iterator[None]:
    """A build step's failure as the error a client sees."""
    from banger_core.proc import CommandFailed
    from banger_debian.common import ArtifactBuildError

    try:
        yield
    except Cancelled:
        raise Cancelled(f"building {kind} {name}") from None
    except (ArtifactBuildError, CommandFailed) as exc:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"building {kind} {name}: {exc}") from None


class DebianSource:
    name = "debian"
    kinds: tuple[Kind, ...] = ("image", "kernel")

    @staticmethod
    def _entries(kind: Kind) -> dict[str, dict[str, str]]:
        return IMAGES if kind == "image" else KERNELS

    def claims(self, kind: Kind, ref: str) -> bool:
        return ref in self._entries(kind)

    def artifact_name(self, kind: Kind, ref: str, options: PullOptions) -> str:
        return ref

    def available(self, kind: Kind, ctx: SourceContext) -> list[dict[str, Any]]:
        return [{"name": name, **entry} for name, entry in self._entries(kind).items()]

    def revision(self, kind: Kind, ref: str, ctx: SourceContext) -> str:
        entry = self._entries(kind)[ref]
        revision = f"recipe:{entry['recipe']}/{_recipe_revision(entry['recipe'])}"
        kernel = ctx.find_kernel(entry["kernel_ref"]) if kind == "image" else None
        if kernel is not None and kernel.modules:
            # the image carries this kernel's modules: a kernel of another version needs a rebuild
            mods = Path(kernel.modules)
            versions = sorted(p.name for p in mods.iterdir() if p.is_dir()) if mods.is_dir() else []
            revision += f";modules:{','.join(versions)}"
        if kind == "image" and ctx.payload.id:  # what banger's plugins put into the image
            revision += f";payload:{ctx.payload.id}"
        return revision

    def fetch(self, kind: Kind, ref: str, job: SourceJob) -> Fetched:
        paths = job.ctx.paths
        build = paths.builds_dir / f"{kind}-{ref}"
        if kind == "image":
            kernel = job.kernel(IMAGES[ref]["kernel_ref"])  # its modules go into the image
        if job.force:  # really rebuild: newest packages, nothing reused but the downloads
            shutil.rmtree(build, ignore_errors=True)
        with _build_errors(kind, ref):
            if kind == "kernel" and ref == "debian-cloud":
                from banger_debian.debian_kernel import build_debian_cloud_kernel

                built = build_debian_cloud_kernel(build, cache=paths.debs_dir, log=job.step)
            elif kind == "kernel":
                from banger_debian.microvm_kernel import build_microvm_kernel

                built = build_microvm_kernel(build, cache=paths.debs_dir, log=job.step, cancel=job.cancel, work=job.work)
            else:
                from banger_debian.debian_image import build_debian_image

                modules = Path(kernel.modules).iterdir() if kernel.modules else iter(())
                mod_dir = next((m for m in modules if m.is_dir()), None)
                built = build_debian_image(
                    build, modules_dir=mod_dir, log=job.step, cancel=job.cancel, work=job.work, payload=job.ctx.payload
                )
                return Fetched(rootfs=Path(built["rootfs"]), kernel_ref=kernel.name)
        return Fetched(kernel_dir=Path(built["kernel"]).parent)


class Busybox:
    """The ``busybox`` service: ``static(log)`` is the path of a static busybox."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def static(self, log: Callable[[str], Any] = lambda _m: None) -> Path:
        from banger_debian.debian_kernel import static_busybox

        return static_busybox(self.cache, log=log)


@hookimpl
def register_sources(register: Callable[[DebianSource], None]) -> None:
    register(DebianSource())


@hookimpl
def register_services(register: Callable[[str, object], None], daemon: Any) -> None:
    register("busybox", Busybox(daemon.paths.debs_dir))


def _kernel_build_check() -> CheckResult:
    """Whether `kernel pull microvm-6.1` can compile here (optional: a warning at most)."""
    from banger_debian.common import ArtifactBuildError
    from banger_debian.microvm_kernel import check_build_tools

    try:
        check_build_tools()
    except ArtifactBuildError as exc:
        return CheckResult.warn("kernel build", f"microvm-6.1 cannot be compiled here: {exc}")
    return CheckResult.ok("kernel build", "gcc, make, bc, bison, flex, libelf-dev present: microvm-6.1 can be compiled")


def _image_build_check() -> CheckResult:
    """Whether the default image can be built here (mmdebstrap, and root for its chroot)."""
    import os

    if shutil.which("mmdebstrap") is None:
        return CheckResult.fail("image build", "mmdebstrap is missing: debian-bookworm cannot be built (apt install mmdebstrap)")
    if os.geteuid() != 0:
        return CheckResult.warn("image build", "not root: mmdebstrap cannot build debian-bookworm as this user")
    return CheckResult.ok("image build", f"mmdebstrap at {shutil.which('mmdebstrap')}: debian-bookworm can be built")


@hookimpl
def register_doctor_checks(register: Callable[[str, Callable[[Any], CheckResult]], None]) -> None:
    register("kernel build", lambda _s: _kernel_build_check())
    register("image build", lambda _s: _image_build_check())
