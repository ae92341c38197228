"""Catalog pulls: kernels and images by name, built on the host by their recipe.

What a pull records as the artifact's ``source`` (``recipe:NAME/REVISION``, or
``bundle:SHA256``) says what made it; when the catalog or banger's recipes move on, an
artifact whose source differs is stale, listings say so, and pulling it again
rebuilds it (an image only when no VM uses it).

One pull per name at a time (per-name locks whose waiters give up when their request
is cancelled); a waiter that gets the lock after a peer finished uses the peer's
result instead of pulling again. Different names pull in parallel.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import Field, model_validator

from banger_core import fsutil, images
from banger_core.config import DEFAULT_IMAGE, DEFAULT_MAX_ROOTFS_MIB
from banger_core.errors import BangerError, Cancelled, ErrorCode, raise_if_cancelled
from banger_core.models import Image, Input, Kernel, fullmatching, validate_input
from banger_core.paths import Paths
from banger_core.sources import ImageSource, SourceJob
from banger_core.store import Store

log = logging.getLogger("banger.pulls")

Progress = Callable[[str, dict[str, Any]], None]


class BundleRef(Input):
    url: Annotated[str, fullmatching(r"(https?|file)://\S+", "an http(s):// or file:// URL")]
    sha256: Annotated[str, fullmatching(r"[0-9a-fA-F]{64}", "a sha256 hex digest (64 hex digits)")]
    size: int | None = Field(default=None, gt=0)


class _Entry(Input):
    description: str = ""
    arch: Literal["x86_64"] = "x86_64"
    recipe: str | None = None
    bundle: BundleRef | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "_Entry":
        if (self.recipe is None) == (self.bundle is None):
            raise ValueError("give exactly one of recipe (built on this host) or bundle {url, sha256, size}")
        return self


class KernelEntry(_Entry):
    pass


class ImageEntry(_Entry):
    kernel_ref: str
    distro: str | None = None


class CatalogFile(Input):
    """A catalog.json: the built-in one, and the user's ``[catalog] path`` on top."""

    version: Literal[1] = 1
    kernels: dict[str, KernelEntry] = Field(default_factory=dict)
    images: dict[str, ImageEntry] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> "CatalogFile":
        for kind, names in (("kernel", self.kernels), ("image", self.images)):
            for name in names:
                images.check_name(kind, name)
        return self


def _load_catalog(text: str, where: str) -> dict[str, Any]:
    try:
        catalog: dict[str, Any] = validate_input(CatalogFile, json.loads(text)).model_dump(exclude_none=True)
        return catalog
    except ValueError as exc:  # JSON syntax, or the model (ValidationError is a ValueError)
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}" for e in exc.errors()[:10])
            raise BangerError(ErrorCode.CONFIG, f"{where}: {problems}") from None
        raise BangerError(ErrorCode.CONFIG, f"{where}: not valid JSON: {exc}") from None
    except BangerError as exc:
        raise BangerError(ErrorCode.CONFIG, f"{where}: {exc.message}") from None


@functools.lru_cache(maxsize=8)
def _validated(text: str, where: str) -> dict[str, Any]:
    """A catalog's text, validated once per content (pulls ask for the catalog several
    times per operation)."""
    return _load_catalog(text, where)


def catalog(extra: str | None = None) -> dict[str, Any]:
    """The built-in catalog, with entries from ``extra`` (a catalog.json) on top: an
    entry of the same name replaces the built-in one whole. Both are validated; the
    user's file is read each time, so an edit applies at once."""
    cat = copy.deepcopy(_validated(resources.files("banger_core").joinpath("catalog.json").read_text(), "built-in catalog"))
    if extra:
        where = f"[catalog] path {extra}"
        try:
            text = Path(extra).expanduser().read_text()
        except OSError as exc:
            raise BangerError(ErrorCode.CONFIG, f"{where}: {exc.strerror or exc}") from None
        more = _validated(text, where)
        for kind in ("kernels", "images"):
            cat[kind].update(copy.deepcopy(more[kind]))
    return cat


def _a(word: str) -> str:
    """The indefinite article for ``word`` (an image, a kernel)."""
    return "an" if word[:1] in "aeiou" else "a"


LAYERS_FILE = "layers.json"  # beside an OCI image's rootfs: the layer digests it was made from


@contextmanager
def source_errors(plugin: str, source: str, ref: str) -> Iterator[None]:
    """A plugin source's own failure as a typed error naming it (BangerErrors and
    cancellation pass through as they are)."""
    try:
        yield
    except (BangerError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise BangerError(
            ErrorCode.OPERATION_FAILED,
            f"image source {source} (plugin {plugin}) failed on {ref!r}: {type(exc).__name__}: {exc}",
        ) from exc


@contextmanager
def build_errors(kind: str, name: str) -> Iterator[None]:
    """A host-side build's failure (a step's or a command's) as the RPC error a client sees."""
    from banger_core.artifacts.common import ArtifactBuildError
    from banger_core.proc import CommandFailed

    try:
        yield
    except Cancelled:
        raise Cancelled(f"building {kind} {name}") from None
    except (ArtifactBuildError, CommandFailed) as exc:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"building {kind} {name}: {exc}") from None


class Puller:
    def __init__(
        self, store: Store, paths: Paths, catalog_path: str | None = None, max_rootfs_mib: int = DEFAULT_MAX_ROOTFS_MIB
    ) -> None:
        self.store = store
        self.paths = paths
        self.catalog_path = catalog_path
        self.max_rootfs_mib = max_rootfs_mib  # [images] max_rootfs_size: every rootfs is checked against it
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._blob_users: dict[object, float] = {}  # OCI pulls running -> when they began
        #: image sources plugins registered (register_sources): (plugin, source), in order
        self.sources: list[tuple[str, ImageSource]] = []

    def catalog(self) -> dict[str, Any]:
        return catalog(self.catalog_path)

    # --- what made an artifact, and whether that is still what the catalog says ------
    def source_for(self, kind: str, name: str, kernel: Kernel | None = None) -> str | None:
        """The source a pull of this catalog entry records now (None: not in the catalog)."""
        from banger_core.artifacts import recipes

        entry = self.catalog()[f"{kind}s"].get(name)
        if entry is None:
            return None
        if entry.get("bundle"):
            return f"bundle:{entry['bundle']['sha256']}"
        recipe = entry.get("recipe", "")
        known = recipes.KERNELS if kind == "kernel" else recipes.IMAGES
        revision = known[recipe].revision() if recipe in known else "?"
        source = f"recipe:{recipe}/{revision}"
        if kind == "image" and kernel is not None and kernel.modules:
            # the image carries this kernel's modules: a kernel of another version needs a rebuild
            versions = (
                sorted(p.name for p in Path(kernel.modules).iterdir() if p.is_dir()) if Path(kernel.modules).is_dir() else []
            )
            source += f";modules:{','.join(versions)}"
        return source

    def stale(self, kind: str, have: Image | Kernel) -> str | None:
        """Why a pulled catalog artifact no longer matches the catalog, or None.

        Only what a catalog pull made is judged: an imported kernel or a registered or
        OCI image that merely shares a catalog name is the user's own.
        """
        if isinstance(have, Image) and not have.managed:
            return None
        if isinstance(have, Image) and have.source is not None:
            for _plugin, src in self.sources:
                if have.source.startswith(f"{src.name}:"):
                    return self._source_stale(src, have)
        if have.source is not None and not have.source.startswith(("recipe:", "bundle:")):
            return None
        kernel = self.store.find_kernel(have.kernel_ref or "") if isinstance(have, Image) else None
        now = self.source_for(kind, have.name, kernel)
        if now is None or have.source == now:
            return None
        if have.source is None:
            return f"pulled before banger recorded recipes; `banger {kind} pull {have.name}` rebuilds it as {now}"
        return f"made by {have.source}, the catalog now makes {now}; `banger {kind} pull {have.name}` refreshes it"

    def _bundle(self, kind: str, name: str, entry: dict[str, Any], progress: Progress | None) -> Path | None:
        """Fetch the entry's bundle into the cache; None when it has none."""
        b = entry.get("bundle")
        if not b:
            return None
        from banger_core import bundles

        target = self.paths.bundles_dir / f"{kind}-{name}"
        if progress:
            progress("pull", {"kind": kind, "name": name, "from": b["url"]})

        def dl(got: int, total: int | None) -> None:
            if progress:
                progress("download", {"name": f"{kind} {name}", "bytes": got, "total": total})

        manifest = bundles.fetch_and_extract(
            b["url"], b["sha256"], b.get("size"), target, dl, max_file_bytes=self.max_rootfs_mib << 20
        )
        got = manifest.get("kind")
        if got != kind:
            shutil.rmtree(target, ignore_errors=True)
            what = f"{_a(got)} {got} bundle" if got in ("image", "kernel") else f"a bundle of unknown kind {got!r}"
            raise BangerError(ErrorCode.BAD_REQUEST, f"{b['url']}: {what}, not {_a(kind)} {kind} bundle")
        return target

    @staticmethod
    def _step(progress: Progress | None) -> Callable[[str], None]:
        """A build's log lines: to the daemon log, and to the client as progress."""

        def step(msg: str) -> None:
            log.info("%s", msg)
            if progress and not msg.startswith("$ "):
                progress("step", {"msg": msg})

        return step

    @staticmethod
    def _work(progress: Progress | None, what: str) -> Callable[[int, int], None]:
        """A long build's progress (steps done of an expected total), to the client,
        throttled here for every builder."""

        said = 0.0

        def work(done: int, total: int) -> None:
            nonlocal said
            now = time.monotonic()
            if progress and (now - said >= 0.5 or done >= total):  # at most 2 events a second reach the client
                said = now
                progress("work", {"name": what, "done": done, "total": total, "unit": "steps"})

        return work

    def _acquire(self, key: str, cancel: threading.Event | None) -> threading.Lock:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        while not lock.acquire(timeout=0.2):
            raise_if_cancelled(cancel, f"waiting for another pull of {key}")
        return lock

    @contextmanager
    def locked(self, kind: str, name: str, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold the per-name lock pulls of ``kind`` ``name`` take, for any other change
        of that artifact (import, register, remove, promote, delete): none of them can
        interleave with a pull of the same name."""
        lock = self._acquire(f"{kind}:{name}", cancel)
        try:
            yield
        finally:
            lock.release()

    # --- kernels ----------------------------------------------------------------------
    def ensure_kernel(self, name: str, *, progress: Progress | None = None, cancel: threading.Event | None = None) -> Kernel:
        """A kernel already here (pulled or imported) serves; else pull it from the catalog."""
        return self.store.find_kernel(name) or self.kernel(name, progress=progress, cancel=cancel)

    def kernel(
        self, name: str, *, force: bool = False, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> Kernel:
        entry = self.catalog()["kernels"].get(name)
        if entry is None:
            raise BangerError(
                ErrorCode.NOT_FOUND,
                f"no kernel {name!r} in the catalog (available: {', '.join(sorted(self.catalog()['kernels']))})",
            )
        lock = self._acquire(f"kernel:{name}", cancel)
        try:
            have = self.store.find_kernel(name)
            if have and not force and not (why := self.stale("kernel", have)):
                return have  # pulled meanwhile (or before)
            if have and not force and progress:
                progress("step", {"msg": f"kernel {name} is stale: {why}"})
            source = self.source_for("kernel", name)
            bundled = self._bundle("kernel", name, entry, progress)
            if bundled is not None:
                try:
                    return images.import_kernel(self.store, self.paths, name, bundled, force=True, origin=source)
                finally:
                    shutil.rmtree(bundled, ignore_errors=True)
            from banger_core.artifacts import recipes

            recipe = recipes.KERNELS.get(entry.get("recipe", ""))
            if recipe is None:
                raise BangerError(ErrorCode.CONFIG, f"kernel {name}: unknown recipe {entry.get('recipe')!r} in the catalog")
            if progress:
                progress("pull", {"kind": "kernel", "name": name})
            build = self.paths.builds_dir / f"kernel-{name}"
            if force:  # really rebuild: newest packages, nothing reused but the downloads
                shutil.rmtree(build, ignore_errors=True)
            with build_errors("kernel", name):
                built = recipe.build(
                    build, self.paths.debs_dir, self._step(progress), cancel, self._work(progress, f"kernel {name}")
                )
            return images.import_kernel(self.store, self.paths, name, Path(built["kernel"]).parent, force=True, origin=source)
        finally:
            lock.release()

    def prune_blobs(self) -> list[str]:
        """Remove cached OCI layers no pulled image was made from (each OCI image keeps
        its layer list beside its rootfs), sparing any touched since the oldest pull
        still running began (it may be using them). The cache then holds what a
        re-pull of a present image could reuse, and nothing a deleted or failed
        pull left. Returns the names removed."""
        from banger_core.oci import blob_name

        if not self.paths.blobs_dir.is_dir():
            return []
        keep: set[str] = set()
        for layers in self.paths.images_dir.glob(f"*/{LAYERS_FILE}") if self.paths.images_dir.is_dir() else ():
            try:
                keep.update(blob_name(d) for d in json.loads(layers.read_text()))
            except (OSError, ValueError, TypeError):
                log.warning("cannot read %s: its layers are not protected from pruning", layers)
        with self._guard:
            cutoff = min(self._blob_users.values(), default=time.time() + 1)
        removed = []
        for f in self.paths.blobs_dir.iterdir():
            try:
                if f.name not in keep and f.stat().st_mtime < cutoff:
                    f.unlink()
                    removed.append(f.name)
            except OSError:
                continue
        if removed:
            log.info("pruned %d cached layer(s) no image uses: %s", len(removed), ", ".join(sorted(removed)))
        return removed

    def _publish(self, name: str, built: Path, *, move: bool = False) -> Path:
        return images.publish_rootfs(self.paths, name, built, self.max_rootfs_mib, move=move)

    # --- plugins' image sources -----------------------------------------------------------
    def source_claiming(self, ref: str) -> tuple[str, ImageSource] | None:
        """The first registered source (plugin order) that claims ``ref``."""
        for plugin, src in self.sources:
            try:
                if src.claims(ref):
                    return plugin, src
            except Exception as exc:  # a source that cannot say does not claim it
                log.warning("image source %s (plugin %s): claims(%r) failed: %s", src.name, plugin, ref, exc)
        return None

    @staticmethod
    def _source_record(src: ImageSource, ref: str, revision: str) -> str:
        return f"{src.name}:{ref}#{revision}"

    def _source_stale(self, src: ImageSource, have: Image) -> str | None:
        assert have.source is not None
        ref, _, made = have.source[len(src.name) + 1 :].rpartition("#")
        try:
            now = src.revision(ref)
        except Exception as exc:
            log.warning("image source %s: revision(%r) failed: %s", src.name, ref, exc)
            return None
        if now == made:
            return None
        return f"made by {src.name} at revision {made}, it now makes {now}; `banger image pull {ref}` refreshes it"

    def from_source(
        self,
        ref: str,
        *,
        force: bool = False,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> Image:
        """Pull ``ref`` from the plugin source that claims it: under the image's pull
        lock, rebuilt only when missing, stale or forced; the rootfs checked and
        published by the core; nothing left behind on failure."""
        claimed = self.source_claiming(ref)
        if claimed is None:
            raise BangerError(ErrorCode.NOT_FOUND, f"no image source claims {ref!r}")
        plugin, src = claimed
        with source_errors(plugin, src.name, ref):
            name = src.image_name(ref)
        images.check_name("image", name)
        cancel = cancel or threading.Event()
        lock = self._acquire(f"image:{name}", cancel)
        try:
            have = self.store.find_image(name)
            if have and not (have.source or "").startswith(f"{src.name}:"):
                raise BangerError(ErrorCode.ALREADY_EXISTS, f"image {name!r} already exists and did not come from {src.name}")
            if have and not force and not self._source_stale(src, have):
                return have
            users = [v.name for v in self.store.list_vms() if v.image == name] if have else []
            if users:
                raise BangerError(
                    ErrorCode.BAD_REQUEST, f"image {name!r} is used by VM(s) {', '.join(users)}: delete them before rebuilding it"
                )
            with source_errors(plugin, src.name, ref):
                revision = src.revision(ref)
            if progress:
                progress("pull", {"kind": "image", "name": name, "from": f"{src.name} ({plugin})"})
            self.paths.images_dir.mkdir(parents=True, exist_ok=True)
            staging = self.paths.staging_dir(self.paths.images_dir / name)
            try:
                job = SourceJob(name=name, staging=staging, cancel=cancel, step=self._step(progress))
                with source_errors(plugin, src.name, ref):
                    fetched = src.fetch(ref, job)
                raise_if_cancelled(cancel, f"image {name}")
                if not fetched.rootfs.resolve().is_relative_to(staging.resolve()):
                    raise BangerError(ErrorCode.PLUGIN, f"image source {src.name}: the rootfs must be made inside job.staging")
                rootfs = self._publish(name, fetched.rootfs, move=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            image = Image(
                name=name,
                rootfs=str(rootfs),
                kernel_ref=fetched.kernel_ref,
                managed=True,
                source=self._source_record(src, ref, revision),
            )
            self.store.upsert_image(image)
            return image
        finally:
            lock.release()

    # --- OCI ---------------------------------------------------------------------------
    def oci(
        self,
        ref: str,
        *,
        name: str | None = None,
        kernel_ref: str | None = None,
        size_mib: int | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        kernel_files: tuple[Path, Path | None, Path | None] | None = None,
    ) -> Image:
        """Pull an image from an OCI registry into a managed, bootable rootfs, booted with
        ``kernel_ref`` (default: the default image's kernel) or with its own kernel,
        initrd and modules (``kernel_files``: imported as a kernel named after the image
        once the rootfs is in place, so a failed pull imports nothing)."""

        from banger_core import oci
        from banger_core.artifacts.debian_kernel import static_busybox
        from banger_core.images import check_name

        parsed = oci.parse_ref(ref)
        name = check_name("image", name or parsed.friendly_name())
        if kernel_files is not None and kernel_ref is not None:
            raise BangerError(ErrorCode.BAD_REQUEST, "give either --kernel-ref or --kernel [--initrd] [--modules], not both")
        kernel_ref = kernel_ref or self.catalog()["images"][DEFAULT_IMAGE]["kernel_ref"]
        lock = self._acquire(f"image:{name}", cancel)
        try:
            if self.store.find_image(name):
                raise BangerError(ErrorCode.ALREADY_EXISTS, f"image {name!r} already exists (choose another --name)")
            if kernel_files is not None:
                if self.store.find_kernel(name):
                    raise BangerError(
                        ErrorCode.ALREADY_EXISTS,
                        f"kernel {name!r} already exists: choose another --name, or boot it with --kernel-ref {name}",
                    )
                for what, f in zip(("--kernel", "--initrd"), kernel_files[:2], strict=False):
                    if f is not None and not f.is_file():
                        raise BangerError(ErrorCode.BAD_REQUEST, f"{what} {f}: no such file")
                if kernel_files[2] is not None and not kernel_files[2].is_dir():
                    raise BangerError(ErrorCode.BAD_REQUEST, f"--modules {kernel_files[2]}: not a directory")
            else:
                kernel = self.ensure_kernel(kernel_ref, progress=progress, cancel=cancel)
            if progress:
                progress("pull", {"kind": "image", "name": name, "from": ref})
            busybox = static_busybox(self.paths.debs_dir, log=log.info)
            self.paths.images_dir.mkdir(parents=True, exist_ok=True)
            staging = self.paths.staging_dir(self.paths.images_dir / name)
            # layers are unpacked under the cache, not the state dir: only the rootfs is state
            self.paths.scratch_dir.mkdir(parents=True, exist_ok=True)
            work = self.paths.staging_dir(self.paths.scratch_dir / f"oci-{name}")
            token = object()
            with self._guard:
                self._blob_users[token] = time.time()

            def download(label: str, got: int, total: int | None = None) -> None:
                if progress:
                    progress("download", {"name": f"{name} {label}", "bytes": got, "total": total})

            try:
                info = oci.pull_to_rootfs(
                    ref,
                    staging / "rootfs.ext4",
                    work,
                    self.paths.blobs_dir,
                    busybox,
                    size_mib=size_mib,
                    log=self._step(progress),
                    download=download,
                    cancel=cancel,
                    max_mib=self.max_rootfs_mib,
                )
                shutil.rmtree(work)
                final = self.paths.images_dir / name
                if final.exists():  # no image of that name (checked above): a leftover
                    shutil.rmtree(final)
                rootfs = self._publish(name, staging / "rootfs.ext4", move=True)
                try:
                    fsutil.atomic_write(final / LAYERS_FILE, json.dumps(info["layers"]) + "\n")
                    if kernel_files is not None:
                        kernel = images.import_kernel_files(self.store, self.paths, name, *kernel_files)
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                shutil.rmtree(work, ignore_errors=True)
                with self._guard:
                    del self._blob_users[token]
                self.prune_blobs()
            image = Image(
                name=name,
                rootfs=str(rootfs),
                kernel_ref=kernel.name,
                managed=True,
                init=oci.INIT_PATH,
                source=f"{ref}@{info['digest']}",
            )
            self.store.upsert_image(image)
            return image
        finally:
            lock.release()

    # --- images -----------------------------------------------------------------------
    def image(
        self, name: str, *, force: bool = False, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> Image:
        entry = self.catalog()["images"].get(name)
        if entry is None:
            raise BangerError(
                ErrorCode.NOT_FOUND,
                f"no image {name!r} in the catalog (available: {', '.join(sorted(self.catalog()['images']))})",
            )
        kernel = self.ensure_kernel(entry["kernel_ref"], progress=progress, cancel=cancel)
        lock = self._acquire(f"image:{name}", cancel)
        try:
            have = self.store.find_image(name)
            if have and not force and not (why := self.stale("image", have)):
                return have  # pulled meanwhile (or before)
            if have:
                users = [v.name for v in self.store.list_vms() if v.image == name]
                if users:
                    raise BangerError(
                        ErrorCode.BAD_REQUEST,
                        f"image {name!r} is used by VM(s) {', '.join(users)}: delete them before rebuilding it",
                    )
                if not force and progress:
                    progress("step", {"msg": f"image {name} is stale: {why}"})
            source = self.source_for("image", name, kernel)
            bundled = self._bundle("image", name, entry, progress)
            if bundled is not None:
                try:
                    rootfs = self._publish(name, bundled / "rootfs.ext4")
                finally:
                    shutil.rmtree(bundled, ignore_errors=True)
                image = Image(name=name, rootfs=str(rootfs), kernel_ref=kernel.name, managed=True, source=source)
                self.store.upsert_image(image)
                return image
            if progress:
                progress("pull", {"kind": "image", "name": name})
            from banger_core.artifacts import recipes

            image_recipe = recipes.IMAGES.get(entry.get("recipe", ""))
            if image_recipe is None:
                raise BangerError(ErrorCode.CONFIG, f"image {name}: unknown recipe {entry.get('recipe')!r} in the catalog")
            modules = Path(kernel.modules).iterdir() if kernel.modules else iter(())
            mod_dir = next((m for m in modules if m.is_dir()), None)
            build = self.paths.builds_dir / f"image-{name}"
            if force:
                shutil.rmtree(build, ignore_errors=True)
            with build_errors("image", name):
                built = image_recipe.build(build, mod_dir, self._step(progress), cancel, self._work(progress, f"image {name}"))
            rootfs = self._publish(name, Path(built["rootfs"]))
            image = Image(name=name, rootfs=str(rootfs), kernel_ref=kernel.name, managed=True, source=source)
            self.store.upsert_image(image)
            return image
        finally:
            lock.release()
