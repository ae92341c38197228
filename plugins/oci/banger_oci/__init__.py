"""banger's OCI source: ``banger image pull REGISTRY/REPO[:TAG|@DIGEST]`` turns an image
from an OCI/Docker registry into a bootable ext4 (registry.py), with banger's
first-boot init from the ``busybox`` service put in.

Layers are cached (verified by digest) under the cache dir and shared between pulls;
each image keeps the list of layers it was made from beside its rootfs, and layers no
image was made from are pruned after every pull and image delete. A tag moves, so what
a pull made is never stale: pulling it again under another ``--name`` makes a copy.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from typing import Any, Callable

from banger_core import hookimpl
from banger_core.sources import Fetched, Kind, PullOptions, SourceContext, SourceJob

#: the first-boot init needs a static busybox (the debian plugin offers one)
requires = ["busybox"]

LAYERS_FILE = "layers.json"  # beside an OCI image's rootfs: the layer digests it was made from

log = logging.getLogger("banger.plugin.oci")


class OciSource:
    name = "oci"
    kinds: tuple[Kind, ...] = ("image",)
    options = frozenset({"name", "kernel_ref", "size_mib", "kernel"})
    #: claims whatever looks like a reference (Docker Hub's NAME:TAG too): asked after the others
    fallback = True

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._pulls: dict[object, float] = {}  # pulls running -> when they began

    def claims(self, kind: Kind, ref: str) -> bool:
        # what looks like a reference is ours; a malformed one is refused with the reason
        return kind == "image" and any(c in ref for c in "/:@")

    def artifact_name(self, kind: Kind, ref: str, options: PullOptions) -> str:
        from banger_oci.registry import parse_ref

        return options.name or parse_ref(ref).friendly_name()

    def revision(self, kind: Kind, ref: str, ctx: SourceContext) -> None:
        return None  # a tag moves: known only by pulling (the digest is recorded)

    def fetch(self, kind: Kind, ref: str, job: SourceJob) -> Fetched:
        from banger_oci import registry

        opts = job.options
        if opts.kernel is not None and opts.kernel_ref is not None:
            raise registry.bad("give either --kernel-ref or --kernel [--initrd] [--modules], not both")
        if opts.kernel is None and (opts.initrd or opts.modules):
            raise registry.bad("--initrd and --modules go with --kernel")
        own = (opts.kernel, opts.initrd, opts.modules) if opts.kernel is not None else None
        kernel_ref = None
        if own is None:
            kernel_ref = opts.kernel_ref or job.ctx.default_kernel()
            if kernel_ref is None:
                raise registry.bad(f"{ref}: no kernel to boot it with: give --kernel-ref or --kernel")
            job.kernel(kernel_ref)  # before the download: a missing kernel fails fast
        busybox = job.service("busybox").static(job.step)
        paths = job.ctx.paths
        # layers are unpacked under the cache, not the state dir: only the rootfs is state
        paths.scratch_dir.mkdir(parents=True, exist_ok=True)
        work = paths.staging_dir(paths.scratch_dir / f"oci-{job.name}")
        token = object()
        with self._guard:
            self._pulls[token] = time.time()
        try:
            info = registry.pull_to_rootfs(
                ref,
                job.staging / "rootfs.ext4",
                work,
                paths.blobs_dir,
                busybox,
                size_mib=opts.size_mib,
                log=job.step,
                download=job.download,
                cancel=job.cancel,
                max_mib=job.ctx.max_rootfs_mib,
                payload=job.ctx.payload,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
            with self._guard:
                del self._pulls[token]
        return Fetched(
            rootfs=job.staging / "rootfs.ext4",
            kernel_ref=kernel_ref,
            own_kernel=own,
            init=registry.INIT_PATH,
            revision=info["digest"],
            files={LAYERS_FILE: json.dumps(info["layers"]) + "\n"},
        )

    def tidy(self, ctx: SourceContext) -> list[str]:
        """Remove cached layers no pulled image was made from, sparing any touched since
        the oldest pull still running began (it may be using them). The cache then holds
        what a re-pull of a present image could reuse, and nothing a deleted or failed
        pull left. Returns the names removed."""
        from banger_oci.registry import blob_name

        blobs = ctx.paths.blobs_dir
        if not blobs.is_dir():
            return []
        keep: set[str] = set()
        images = ctx.paths.images_dir
        for layers in images.glob(f"*/{LAYERS_FILE}") if images.is_dir() else ():
            try:
                keep.update(blob_name(d) for d in json.loads(layers.read_text()))
            except (OSError, ValueError, TypeError):
                log.warning("cannot read %s: its layers are not protected from pruning", layers)
        with self._guard:
            cutoff = min(self._pulls.values(), default=time.time() + 1)
        removed = []
        for f in blobs.iterdir():
            try:
                if f.name not in keep and f.stat().st_mtime < cutoff:
                    f.unlink()
                    removed.append(f.name)
            except OSError:
                continue
        if removed:
            log.info("pruned %d cached layer(s) no image uses: %s", len(removed), ", ".join(sorted(removed)))
        return removed


@hookimpl
def register_sources(register: Callable[[Any], None]) -> None:
    register(OciSource())
