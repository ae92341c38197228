"""Sources of images and kernels: what a plugin registers through ``register_sources``
so that ``banger image pull REF``, ``banger kernel pull REF`` and ``vm create --image
REF`` can get an artifact from it.

The core keeps the mechanism (``banger_core.pulls``): the per-name pull lock, one pull
per name, staleness, progress throttling, the rootfs checks, publishing, the store. A
source only says which refs it claims, the name and revision a pull records, and
fetches or builds the artifact into the staging dir the core hands it. Documented in
docs/plugins.md (``register_sources``).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

from banger_core.errors import raise_if_cancelled

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.models import Kernel
    from banger_core.paths import Paths

Kind = Literal["image", "kernel"]

#: a source's name: it is shown with what it made (``image show``'s source)
SOURCE_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")

#: the pull options a source may take (``Source.options``), as the CLI spells them
OPTION_FLAGS = {"name": "--name", "kernel_ref": "--kernel-ref", "size_mib": "--size", "kernel": "--kernel"}


@dataclass(frozen=True)
class PullOptions:
    """What the user gave ``image pull`` beside REF. A source lists the ones it takes
    in ``Source.options``; the core refuses the others before asking it anything."""

    name: str | None = None
    kernel_ref: str | None = None
    size_mib: int | None = None
    #: the image's own kernel (with its initrd and /lib/modules/VERSION dir)
    kernel: Path | None = None
    initrd: Path | None = None
    modules: Path | None = None

    def given(self) -> list[str]:
        return [key for key in OPTION_FLAGS if getattr(self, key) is not None]


#: where banger's minimal inits look for early-boot services: every executable here is
#: started in the background at boot (an image with systemd gets a unit instead)
GUEST_BOOT_DIR = "/usr/local/libexec/banger/boot.d"


@dataclass(frozen=True)
class GuestFile:
    """A file every image banger builds carries (``register_guest_payload``): ``data``
    with ``mode``, or a symlink to ``link``. ``path`` is absolute inside the guest."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    link: str | None = None


@dataclass
class GuestPayload:
    """What the plugins put into images (register_guest_payload), applied by sources to
    a root filesystem tree before they make the filesystem."""

    files: list[GuestFile] = field(default_factory=list)

    @property
    def id(self) -> str:
        """What identifies this payload ("" for none): a source records it in its
        revision, so images made with another payload are stale."""
        if not self.files:
            return ""
        import hashlib

        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path):
            h.update(f"{f.path}\0{f.mode:o}\0{f.link or ''}\0".encode() + f.data + b"\0")
        return h.hexdigest()[:12]

    def apply(self, tree: Path) -> None:
        """Write every file into ``tree`` (symlinks in the tree resolved inside it, never
        out of it), parents made 0755."""
        import os

        from banger_core import fsutil

        for f in self.files:
            dest = resolve_in_tree(tree, f.path)
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            if dest.is_symlink() or dest.is_file():
                dest.unlink()
            if f.link is not None:
                dest.symlink_to(f.link)
            else:
                fsutil.atomic_write(dest, f.data)
                os.chmod(dest, f.mode)


def resolve_in_tree(root: Path, path: str, depth: int = 0) -> Path:
    """``path`` (absolute, as the guest sees it) inside the tree at ``root``: symlinks on
    the way are followed as the guest would follow them, and never lead out of ``root``."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{path!r}: '..' is not allowed")
    here = root
    for i, part in enumerate(parts):
        nxt = here / part
        if nxt.is_symlink() and i < len(parts) - 1:
            if depth > 20:
                raise ValueError(f"{path!r}: too many symlinks")
            target = os.readlink(nxt)
            base = "/" if target.startswith("/") else "/" + str(here.relative_to(root))
            joined = os.path.normpath(os.path.join(base, target, *parts[i + 1 :]))
            return resolve_in_tree(root, joined, depth + 1)
        here = nxt
    return here


@dataclass
class SourceContext:
    """What a source may read outside a pull (``revision``, ``available``, ``tidy``)."""

    #: banger's paths: ``cache_dir`` and below are the place for a source's caches
    paths: "Paths"
    #: a kernel in the store by name, or None (not pulled: never pulls)
    find_kernel: Callable[[str], "Kernel | None"]
    #: the kernel the default image boots (``[vm] image``), when a source says so
    default_kernel: Callable[[], "str | None"]
    #: ``[images] max_rootfs_size`` in MiB: the core refuses a bigger rootfs
    max_rootfs_mib: int
    #: what plugins put into every image (register_guest_payload): ``payload.apply(tree)``
    #: before making a filesystem from a tree, and ``payload.id`` in the revision
    payload: GuestPayload = field(default_factory=GuestPayload)


@dataclass
class SourceJob:
    """What the core hands ``Source.fetch``: where to build, and how to report."""

    kind: Kind
    #: the artifact's name in banger (what ``banger image list`` will show)
    name: str
    #: an empty directory, the source's own: build in it; the core removes it
    #: afterwards, whatever happens
    staging: Path
    ctx: SourceContext
    options: PullOptions = field(default_factory=PullOptions)
    #: ``--force``: rebuild from scratch (reuse nothing but downloads)
    force: bool = False
    #: set when the client goes away or the daemon stops: stop soon (``check_cancelled``)
    cancel: threading.Event = field(default_factory=threading.Event)
    #: ``step("message")``: a line of progress the user sees (and the daemon log)
    step: Callable[[str], None] = lambda _msg: None
    #: ``work(done, total)``: a long build's progress in steps (throttled by the core)
    work: Callable[[int, int], None] = lambda _done, _total: None
    #: ``download(label, bytes_so_far, total_or_None)``: a download's progress
    download: Callable[[str, int, "int | None"], None] = lambda _label, _got, _total: None
    #: ``kernel(ref)``: the kernel ``ref``, pulled first if missing and a source has it
    kernel: Callable[[str], "Kernel"] = field(default=lambda ref: _no_kernel(ref))
    #: ``service(capability)``: a service another plugin offers (declare ``requires``)
    service: Callable[[str], Any] = field(default=lambda cap: _no_service(cap))

    def check_cancelled(self) -> None:
        """Raise ``errors.Cancelled`` if the pull was cancelled (call it between steps)."""
        raise_if_cancelled(self.cancel, f"{self.kind} {self.name}")


def _no_kernel(ref: str) -> "Kernel":
    raise RuntimeError(f"no kernel lookup in this job ({ref})")


def _no_service(capability: str) -> Any:
    raise RuntimeError(f"no services in this job ({capability})")


@dataclass
class Fetched:
    """What ``fetch`` made. An image: an ext4 root filesystem (moved in place when it is
    inside ``job.staging``, else copied; checked by the core either way) and the kernel
    it boots (``kernel_ref``, or ``own_kernel``: imported as a kernel named after the
    image). A kernel: ``kernel_dir``, a directory ``banger kernel import`` understands."""

    rootfs: Path | None = None
    kernel_ref: str | None = None
    own_kernel: tuple[Path, Path | None, Path | None] | None = None
    #: the image's init (``init=`` on the kernel command line) when not /sbin/init
    init: str | None = None
    kernel_dir: Path | None = None
    #: what was made, when only the fetch can tell (a registry digest); else the core
    #: records ``revision()`` as asked after the fetch
    revision: str | None = None
    #: small text files kept beside the image's rootfs (what it was made from)
    files: dict[str, str] = field(default_factory=dict)


class Source(Protocol):
    """A source of images and/or kernels. ``name`` must match ``SOURCE_NAME_RE``.

    Optional: ``options`` (a set of ``PullOptions`` field names it takes; default
    none), ``available(kind, ctx) -> list[dict]`` (what it offers by name, each a dict
    with ``name``, ``description`` and, for images, ``kernel_ref``: ``image list
    --available``) and ``tidy(ctx) -> list[str]`` (drop caches no artifact needs; called
    after its pulls and after an image is deleted; returns what it removed)."""

    name: str
    kinds: tuple[Kind, ...]

    def claims(self, kind: Kind, ref: str) -> bool:
        """Whether ``ref`` (what the user typed after ``pull``) is this source's."""
        ...

    def artifact_name(self, kind: Kind, ref: str, options: PullOptions) -> str:
        """The name the artifact gets in banger when pulled from ``ref``."""
        ...

    def revision(self, kind: Kind, ref: str, ctx: SourceContext) -> str | None:
        """What a pull of ``ref`` would make now (a recipe revision, a digest): recorded
        with the artifact; when it changes, the artifact is stale and a pull rebuilds
        it. None: the source cannot say without fetching (a registry tag): what it made
        is never stale, and a second pull under the same name is refused."""
        ...

    def fetch(self, kind: Kind, ref: str, job: SourceJob) -> Fetched:
        """Build or download the artifact into ``job.staging``; raise ``BangerError``
        for what the user can act on."""
        ...


def parse_record(record: str | None) -> tuple[str, str] | None:
    """(ref, revision) from what a pull recorded as an artifact's source,
    ``REF#REVISION``; None for what no pull made (imported, registered)."""
    if record is None or "#" not in record:
        return None
    ref, _sep, revision = record.rpartition("#")
    return ref, revision
