"""Bundles (``.tar.zst`` made by ``banger image|kernel bundle``) as two built-in
sources like any plugin's: the catalog, images and kernels by name fetched from the
URLs a catalog.json names (``[catalog] path``), each checked against its sha256 and
size, asked first (a catalog entry replaces a plugin's artifact of the same name); and
``file``, a bundle file on this host (``image pull /path/x.tar.zst``). Not essential: a
host that only registers its own images and kernels may disable it
(``[plugins] disable = ["catalog"]``)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal

from pydantic import Field, ValidationError

from banger_core.errors import BangerError, ErrorCode
from banger_core.hookspecs import hookimpl
from banger_core.models import Input, fullmatching, validate_input
from banger_core.sources import Fetched, Kind, PullOptions, SourceContext, SourceJob

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.context import CheckFn, CheckResult, DoctorContext
    from banger_core.runtime import Runtime


class BundleRef(Input):
    url: Annotated[str, fullmatching(r"(https?|file)://\S+", "an http(s):// or file:// URL")]
    sha256: Annotated[str, fullmatching(r"[0-9a-fA-F]{64}", "a sha256 hex digest (64 hex digits)")]
    size: int | None = Field(default=None, gt=0)


class KernelEntry(Input):
    description: str = ""
    arch: Literal["x86_64"] = "x86_64"
    bundle: BundleRef


class ImageEntry(KernelEntry):
    kernel_ref: str
    distro: str | None = None


class CatalogFile(Input):
    """A catalog.json (``[catalog] path``)."""

    version: Literal[1] = 1
    kernels: dict[str, KernelEntry] = Field(default_factory=dict)
    images: dict[str, ImageEntry] = Field(default_factory=dict)

    def model_post_init(self, _context: Any) -> None:
        from banger_core.images import check_name

        for kind, names in (("kernel", self.kernels), ("image", self.images)):
            for name in names:
                check_name(kind, name)


@functools.lru_cache(maxsize=8)
def _validated(text: str, where: str) -> dict[str, Any]:
    """A catalog's text, validated once per content (a pull asks several times)."""
    try:
        catalog: dict[str, Any] = validate_input(CatalogFile, json.loads(text)).model_dump(exclude_none=True)
        return catalog
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}" for e in exc.errors()[:10])
        raise BangerError(ErrorCode.CONFIG, f"{where}: {problems}") from None
    except ValueError as exc:
        raise BangerError(ErrorCode.CONFIG, f"{where}: not valid JSON: {exc}") from None
    except BangerError as exc:
        raise BangerError(ErrorCode.CONFIG, f"{where}: {exc.message}") from None


def load(path: str | None) -> dict[str, Any]:
    """The catalog at ``path`` (read each time, so an edit applies at once); empty when
    no path is configured."""
    if not path:
        return {"version": 1, "kernels": {}, "images": {}}
    where = f"[catalog] path {path}"
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise BangerError(ErrorCode.CONFIG, f"{where}: {exc.strerror or exc}") from None
    return _validated(text, where)


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


class CatalogSource:
    name = "catalog"
    kinds: tuple[Kind, ...] = ("image", "kernel")

    def __init__(self, path: str | None) -> None:
        self.path = path

    def _entries(self, kind: Kind) -> dict[str, Any]:
        entries: dict[str, Any] = load(self.path)[f"{kind}s"]
        return entries

    def claims(self, kind: Kind, ref: str) -> bool:
        return ref in self._entries(kind)

    def artifact_name(self, kind: Kind, ref: str, options: PullOptions) -> str:
        return ref

    def available(self, kind: Kind, ctx: SourceContext) -> list[dict[str, Any]]:
        return [{"name": n, **{k: v for k, v in e.items() if k != "bundle"}} for n, e in self._entries(kind).items()]

    def revision(self, kind: Kind, ref: str, ctx: SourceContext) -> str:
        return f"bundle:{self._entries(kind)[ref]['bundle']['sha256']}"

    def fetch(self, kind: Kind, ref: str, job: SourceJob) -> Fetched:
        from banger_core import bundles

        entry = self._entries(kind)[ref]
        b = entry["bundle"]
        job.step(f"fetching {b['url']}")
        target = job.staging / "bundle"
        manifest = bundles.fetch_and_extract(
            b["url"],
            b["sha256"],
            b.get("size"),
            target,
            lambda got, total: job.download("", got, total),
            max_file_bytes=job.ctx.max_rootfs_mib << 20,
        )
        return _unpacked(kind, b["url"], manifest, target, entry["kernel_ref"] if kind == "image" else None)


def _unpacked(kind: Kind, where: str, manifest: dict[str, Any], target: Path, kernel_ref: str | None) -> Fetched:
    """What an unpacked bundle holds, once its manifest says it is of ``kind``."""
    got = manifest.get("kind")
    if got != kind:
        what = f"{_a(got)} {got} bundle" if got in ("image", "kernel") else f"a bundle of unknown kind {got!r}"
        raise BangerError(ErrorCode.BAD_REQUEST, f"{where}: {what}, not {_a(kind)} {kind} bundle")
    if kind == "kernel":
        return Fetched(kernel_dir=target)
    return Fetched(rootfs=target / "rootfs.ext4", kernel_ref=kernel_ref)


BUNDLE_SUFFIX = ".tar.zst"


class FileSource:
    """A bundle file on this host: ``image pull /abs/path/NAME.tar.zst [--name N]`` (or a
    ``file://`` URL; the CLI makes a path given relative absolute). The artifact is named
    after the file (or ``--name``); what it was made from is the file's sha256, and a
    file may change under its path, so a second pull of the same name is refused."""

    name = "file"
    kinds: tuple[Kind, ...] = ("image", "kernel")
    options = frozenset({"name"})

    @staticmethod
    def _path(ref: str) -> Path | None:
        text = ref.removeprefix("file://")
        return Path(text) if text.startswith("/") and text.endswith(BUNDLE_SUFFIX) else None

    def claims(self, kind: Kind, ref: str) -> bool:
        return self._path(ref) is not None

    def artifact_name(self, kind: Kind, ref: str, options: PullOptions) -> str:
        path = self._path(ref)
        assert path is not None
        return options.name or path.name.removesuffix(BUNDLE_SUFFIX)

    def revision(self, kind: Kind, ref: str, ctx: SourceContext) -> None:
        return None

    def fetch(self, kind: Kind, ref: str, job: SourceJob) -> Fetched:
        import hashlib

        from banger_core import bundles

        path = self._path(ref)
        assert path is not None
        if not path.is_file():
            raise BangerError(ErrorCode.NOT_FOUND, f"{path}: no such bundle file")
        job.step(f"unpacking {path}")
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(bundles.CHUNK):
                digest.update(chunk)
        target = job.staging / "bundle"
        manifest = bundles.extract(path, target, job.ctx.max_rootfs_mib << 20, label=str(path))
        fetched = _unpacked(kind, str(path), manifest, target, manifest.get("kernel_ref"))
        fetched.revision = f"sha256:{digest.hexdigest()}"
        return fetched


@hookimpl
def register_sources(register: Callable[[Any], None], runtime: "Runtime") -> None:
    register(CatalogSource(runtime.config.core.catalog.path))
    register(FileSource())


def _catalog_check(rt: "Runtime") -> "CheckResult":
    """A `[catalog] path` must name a readable catalog file."""
    from banger_core.context import CheckResult

    path = rt.config.core.catalog.path
    if not path:
        return CheckResult.ok("catalog", "no [catalog] path: no bundles by name")
    try:
        cat = load(path)
    except BangerError as exc:
        return CheckResult.fail("catalog", f"{rt.config.path}: {exc.message}")
    return CheckResult.ok("catalog", f"{path}: {len(cat['images'])} image(s), {len(cat['kernels'])} kernel(s)")


@hookimpl
def register_doctor_checks(register: Callable[[str, "CheckFn"], None], doctor: "DoctorContext") -> None:
    rt = doctor.runtime
    if rt is not None:
        register("catalog", lambda _s: _catalog_check(rt))
