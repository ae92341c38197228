"""The pull engine: images and kernels from the sources plugins register.

What a pull records as the artifact's ``source`` (``REF#REVISION``, sources.py) says
what made it; when the source would make something else now, the artifact is stale,
listings say so, and pulling it again rebuilds it (an image only when no VM uses it).

One pull per name at a time (per-name locks whose waiters give up when their request
is cancelled); a waiter that gets the lock after a peer finished uses the peer's
result instead of pulling again. Different names pull in parallel.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from banger_core import fsutil, images
from banger_core.config import DEFAULT_MAX_ROOTFS_MIB
from banger_core.errors import BangerError, Cancelled, ErrorCode, raise_if_cancelled
from banger_core.models import Image, Kernel
from banger_core.paths import Paths
from banger_core.sources import OPTION_FLAGS, Fetched, Kind, PullOptions, Source, SourceContext, SourceJob, parse_record
from banger_core.store import Store

log = logging.getLogger("banger.pulls")

Progress = Callable[[str, dict[str, Any]], None]


@contextmanager
def source_errors(plugin: str, source: str, ref: str) -> Iterator[None]:
    """A source's own failure as a typed error naming it (BangerErrors and
    cancellation pass through as they are; a failed command says which)."""
    from banger_core.proc import CommandFailed

    try:
        yield
    except Cancelled:
        raise Cancelled(f"pulling {ref}") from None
    except (BangerError, KeyboardInterrupt):
        raise
    except CommandFailed as exc:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"{ref}: {exc}") from None
    except Exception as exc:
        raise BangerError(
            ErrorCode.OPERATION_FAILED, f"source {source} (plugin {plugin}) failed on {ref!r}: {type(exc).__name__}: {exc}"
        ) from exc


class Puller:
    def __init__(
        self,
        store: Store,
        paths: Paths,
        max_rootfs_mib: int = DEFAULT_MAX_ROOTFS_MIB,
        default_image: str | None = None,
    ) -> None:
        self.store = store
        self.paths = paths
        self.max_rootfs_mib = max_rootfs_mib  # [images] max_rootfs_size: every rootfs is checked against it
        self.default_image = default_image
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        #: the sources plugins registered (register_sources): (plugin, source), in order
        self.sources: list[tuple[str, Source]] = []
        #: plugins that are disabled (named when no source claims a ref)
        self.disabled: list[str] = []
        #: ``service_for(plugin, capability)``: services for a source's plugin
        self.service_for: Callable[[str, str], Any] = lambda _p, cap: _no_service(cap)
        self.ctx = SourceContext(
            paths=paths,
            find_kernel=store.find_kernel,
            default_kernel=self.default_kernel,
            max_rootfs_mib=max_rootfs_mib,
        )

    # --- which source ------------------------------------------------------------------
    def claiming(self, kind: Kind, ref: str) -> tuple[str, Source] | None:
        """The first source (plugin order) of ``kind`` artifacts that claims ``ref``."""
        for plugin, src in self.sources:
            if kind not in src.kinds:
                continue
            try:
                if src.claims(kind, ref):
                    return plugin, src
            except BangerError:  # the user's to act on (a bad catalog file)
                raise
            except Exception as exc:  # a source that cannot say does not claim it
                log.warning("source %s (plugin %s): claims(%r) failed: %s", src.name, plugin, ref, exc)
        return None

    def available(self, kind: Kind) -> list[dict[str, Any]]:
        """What the sources offer by name (the first source of a name wins), sorted."""
        seen: dict[str, dict[str, Any]] = {}
        for plugin, src in self.sources:
            offer = getattr(src, "available", None)
            if kind not in src.kinds or offer is None:
                continue
            try:
                for entry in offer(kind, self.ctx):
                    seen.setdefault(entry["name"], {**entry, "source": src.name, "plugin": plugin})
            except BangerError:
                raise
            except Exception as exc:
                log.warning("source %s (plugin %s): available(%s) failed: %s", src.name, plugin, kind, exc)
        return [seen[n] for n in sorted(seen)]

    def default_kernel(self) -> str | None:
        """The kernel the default image boots, as its source says (None: no source says)."""
        for entry in self.available("image"):
            if entry["name"] == self.default_image:
                return entry.get("kernel_ref")
        return None

    def _unclaimed(self, kind: Kind, ref: str) -> BangerError:
        names = sorted({f"{s.name} ({p})" for p, s in self.sources if kind in s.kinds})
        offered = [entry["name"] for entry in self.available(kind)]
        msg = f"no {kind} source claims {ref!r} ("
        msg += f"available by name: {', '.join(offered)}; " if offered else ""
        msg += f"sources: {', '.join(names) or 'none'})"
        if self.disabled:
            msg += f"; disabled plugin(s) that may: {', '.join(self.disabled)}"
        return BangerError(ErrorCode.NOT_FOUND, msg)

    # --- staleness -----------------------------------------------------------------------
    def stale(self, kind: Kind, have: Image | Kernel) -> str | None:
        """Why a pulled artifact no longer matches what its source makes now, or None.

        Only what a pull made is judged: a registered image, or one no enabled source
        claims now, is the user's own."""
        parsed = parse_record(have.source)
        if parsed is None or (isinstance(have, Image) and not have.managed):
            return None
        ref, made = parsed
        claimed = self.claiming(kind, ref)
        if claimed is None:
            return None
        plugin, src = claimed
        try:
            now = src.revision(kind, ref, self.ctx)
        except BangerError:
            raise
        except Exception as exc:
            log.warning("source %s (plugin %s): revision(%r) failed: %s", src.name, plugin, ref, exc)
            return None
        return self._why_stale(kind, ref, src, made, now)

    @staticmethod
    def _why_stale(kind: Kind, ref: str, src: Source, made: str, now: str | None) -> str | None:
        """The staleness rule: what was made differs from what the source makes now."""
        if now is None or made == now:
            return None
        if not made:
            return f"pulled before banger recorded what made it; `banger {kind} pull {ref}` rebuilds it as {now}"
        return f"made by {src.name} at {made}, it now makes {now}; `banger {kind} pull {ref}` refreshes it"

    # --- locks and progress --------------------------------------------------------------
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
        throttled here for every source."""
        said = 0.0

        def work(done: int, total: int) -> None:
            nonlocal said
            now = time.monotonic()
            if progress and (now - said >= 0.5 or done >= total):  # at most 2 events a second reach the client
                said = now
                progress("work", {"name": what, "done": done, "total": total, "unit": "steps"})

        return work

    @staticmethod
    def _download(progress: Progress | None, what: str, name: str) -> Callable[[str, int, int | None], None]:
        """A download's progress: ``label`` says which part (a layer), else it is ``what``."""

        def download(label: str, got: int, total: int | None = None) -> None:
            if progress:
                progress("download", {"name": f"{name} {label}" if label else what, "bytes": got, "total": total})

        return download

    # --- pulling --------------------------------------------------------------------------
    def ensure_kernel(self, ref: str, progress: Progress | None = None, cancel: threading.Event | None = None) -> Kernel:
        """The kernel ``ref``: in the store, else pulled from the source claiming it."""
        got = self._ensure("kernel", ref, progress, cancel)
        assert isinstance(got, Kernel)
        return got

    def ensure_image(self, ref: str, progress: Progress | None = None, cancel: threading.Event | None = None) -> Image:
        """The image ``ref``: in the store, else pulled from the source claiming it."""
        got = self._ensure("image", ref, progress, cancel)
        assert isinstance(got, Image)
        return got

    def _ensure(self, kind: Kind, ref: str, progress: Progress | None, cancel: threading.Event | None) -> Image | Kernel:
        have = self._find(kind, ref)
        if have is not None:
            return have
        if self.claiming(kind, ref) is None:  # raises not_found, naming `banger image|kernel list`
            return self.store.get_image(ref) if kind == "image" else self.store.get_kernel(ref)
        return self.pull(kind, ref, progress=progress, cancel=cancel)

    def _find(self, kind: Kind, name: str) -> Image | Kernel | None:
        return self.store.find_image(name) if kind == "image" else self.store.find_kernel(name)

    def pull(
        self,
        kind: Kind,
        ref: str,
        *,
        force: bool = False,
        options: PullOptions | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> Image | Kernel:
        """Pull ``ref`` from the source that claims it: under the artifact's pull lock,
        fetched only when missing, stale or forced; a rootfs checked and published by
        the core; nothing left behind on failure."""
        options = options or PullOptions()
        if options.name is not None:
            images.check_name(kind, options.name)
        claimed = self.claiming(kind, ref)
        if claimed is None:
            raise self._unclaimed(kind, ref)
        plugin, src = claimed
        takes: frozenset[str] = getattr(src, "options", frozenset())
        refused = [OPTION_FLAGS[o] for o in options.given() if o not in takes]
        if refused:
            raise BangerError(
                ErrorCode.BAD_REQUEST,
                f"{', '.join(refused)} do(es) not apply to {ref!r} (source {src.name}, plugin {plugin}"
                + (f", which takes {', '.join(OPTION_FLAGS[o] for o in sorted(takes))})" if takes else ", which takes none)"),
            )
        with source_errors(plugin, src.name, ref):
            name = src.artifact_name(kind, ref, options)
        images.check_name(kind, name)
        cancel = cancel or threading.Event()
        lock = self._acquire(f"{kind}:{name}", cancel)
        try:
            have = self._find(kind, name)
            if have is not None:
                reused = self._reuse(kind, ref, name, have, src, force, progress)
                if reused is not None:
                    return reused
            if progress:
                progress("pull", {"kind": kind, "name": name, "from": f"{src.name} ({plugin})"})
            parent = self.paths.images_dir if kind == "image" else self.paths.kernels_dir
            parent.mkdir(parents=True, exist_ok=True)
            staging = self.paths.staging_dir(parent / name)
            try:
                job = SourceJob(
                    kind=kind,
                    name=name,
                    staging=staging,
                    ctx=self.ctx,
                    options=options,
                    force=force,
                    cancel=cancel,
                    step=self._step(progress),
                    work=self._work(progress, f"{kind} {name}"),
                    download=self._download(progress, f"{kind} {name}", name),
                    kernel=lambda kref: self.ensure_kernel(kref, progress, cancel),
                    service=lambda cap: self.service_for(plugin, cap),
                )
                with source_errors(plugin, src.name, ref):
                    fetched = src.fetch(kind, ref, job)
                    raise_if_cancelled(cancel, f"{kind} {name}")
                    revision = fetched.revision or src.revision(kind, ref, self.ctx) or ""
                record = f"{ref}#{revision}"
                if kind == "kernel":
                    return self._publish_kernel(name, fetched, record, src)
                return self._publish_image(name, fetched, record, src, staging, progress, cancel)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                self._tidy(plugin, src)
        finally:
            lock.release()

    def _reuse(
        self, kind: Kind, ref: str, name: str, have: Image | Kernel, src: Source, force: bool, progress: Progress | None
    ) -> Image | Kernel | None:
        """What a pull of an existing artifact does: reuse it (returned), refuse, or
        go on and rebuild it (None)."""
        parsed = parse_record(have.source)
        mine = parsed is not None and parsed[0] == ref and not (isinstance(have, Image) and not have.managed)
        now = src.revision(kind, ref, self.ctx) if mine else None
        if parsed is None or now is None:  # not this source's, or a snapshot (a tag): never rebuilt in place
            more = " (choose another --name)" if "name" in getattr(src, "options", ()) else ""
            raise BangerError(ErrorCode.ALREADY_EXISTS, f"{kind} {name!r} already exists{more}")
        why = self._why_stale(kind, ref, src, parsed[1], now)
        if not force and not why:
            return have  # pulled meanwhile (or before)
        if isinstance(have, Image):
            users = [v.name for v in self.store.list_vms() if v.image == name]
            if users:
                raise BangerError(
                    ErrorCode.BAD_REQUEST, f"image {name!r} is used by VM(s) {', '.join(users)}: delete them before rebuilding it"
                )
            from banger_core.images import refuse_if_snapshotted

            refuse_if_snapshotted(self.store, self.paths, name, "rebuilding it")
        if why and not force and progress:
            progress("step", {"msg": f"{kind} {name} is stale: {why}"})
        return None

    def _publish_kernel(self, name: str, fetched: Fetched, record: str, src: Source) -> Kernel:
        if fetched.kernel_dir is None:
            raise BangerError(ErrorCode.PLUGIN, f"source {src.name}: a kernel fetch must return kernel_dir")
        return images.import_kernel(self.store, self.paths, name, fetched.kernel_dir, force=True, origin=record)

    def _publish_image(
        self,
        name: str,
        fetched: Fetched,
        record: str,
        src: Source,
        staging: Path,
        progress: Progress | None,
        cancel: threading.Event,
    ) -> Image:
        if fetched.rootfs is None:
            raise BangerError(ErrorCode.PLUGIN, f"source {src.name}: an image fetch must return rootfs")
        own = fetched.own_kernel
        if own is not None:
            self._check_own_kernel(name, own)
            kernel_ref: str | None = name
        else:
            kernel_ref = fetched.kernel_ref or self.default_kernel()
            if kernel_ref is None:
                raise BangerError(ErrorCode.PLUGIN, f"source {src.name}: image {name} names no kernel")
            self.ensure_kernel(kernel_ref, progress, cancel)
        inside = fetched.rootfs.resolve().is_relative_to(staging.resolve())
        final = self.paths.images_dir / name
        if final.exists():  # no image of that name in the store, or being replaced: a leftover
            shutil.rmtree(final)
        rootfs = images.publish_rootfs(self.paths, name, fetched.rootfs, self.max_rootfs_mib, move=inside)
        try:
            for fname, text in fetched.files.items():
                if "/" in fname or fname in ("", ".", "..", rootfs.name):
                    raise BangerError(ErrorCode.PLUGIN, f"source {src.name}: bad image file name {fname!r}")
                fsutil.atomic_write(final / fname, text)
            if own is not None:
                images.import_kernel_files(self.store, self.paths, name, *own)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        image = Image(name=name, rootfs=str(rootfs), kernel_ref=kernel_ref, managed=True, init=fetched.init, source=record)
        self.store.upsert_image(image)
        return image

    def _check_own_kernel(self, name: str, own: tuple[Path, Path | None, Path | None]) -> None:
        if self.store.find_kernel(name):
            raise BangerError(
                ErrorCode.ALREADY_EXISTS,
                f"kernel {name!r} already exists: choose another --name, or boot it with --kernel-ref {name}",
            )
        for what, f in zip(("--kernel", "--initrd"), own[:2], strict=False):
            if f is not None and not f.is_file():
                raise BangerError(ErrorCode.BAD_REQUEST, f"{what} {f}: no such file")
        if own[2] is not None and not own[2].is_dir():
            raise BangerError(ErrorCode.BAD_REQUEST, f"--modules {own[2]}: not a directory")

    def _tidy(self, plugin: str, src: Source) -> list[str]:
        tidy = getattr(src, "tidy", None)
        if tidy is None:
            return []
        try:
            return list(tidy(self.ctx))
        except Exception as exc:
            log.warning("source %s (plugin %s): tidy failed: %s", src.name, plugin, exc)
            return []

    def tidy(self) -> list[str]:
        """Every source drops the caches no artifact needs now (after an image delete)."""
        return [gone for plugin, src in self.sources for gone in self._tidy(plugin, src)]


def _no_service(capability: str) -> Any:
    raise BangerError(ErrorCode.PLUGIN, f"no {capability!r} service outside the daemon")
