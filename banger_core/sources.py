"""Sources of images: what a plugin registers through ``register_sources`` so that
``banger image pull REF`` (and ``vm create --image REF``) can get an image from it.

The core keeps the mechanism: the per-name pull lock, staleness, the rootfs checks,
publishing and the store. A source only says which refs it claims, the revision a
pull would record now, and builds the root filesystem into the staging dir the core
hands it. Documented in docs/plugins.md (``register_sources``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from banger_core.errors import raise_if_cancelled

#: a source's name: it prefixes what an image records as its source (``NAME:REVISION``)
SOURCE_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")


@dataclass
class SourceJob:
    """What the core hands ``ImageSource.fetch``: where to build, and how to report."""

    #: the image's name in banger (what ``banger image list`` will show)
    name: str
    #: an empty directory, the source's own: build the root filesystem in it; the core
    #: removes it afterwards, whatever happens
    staging: Path
    #: set when the client goes away or the daemon stops: stop soon (``check_cancelled``)
    cancel: threading.Event = field(default_factory=threading.Event)
    #: ``step("message")``: a line of progress the user sees
    step: Callable[[str], None] = lambda _msg: None

    def check_cancelled(self) -> None:
        """Raise ``errors.Cancelled`` if the pull was cancelled (call it between steps)."""
        raise_if_cancelled(self.cancel, f"image {self.name}")


@dataclass
class Fetched:
    """What ``fetch`` made: an ext4 root filesystem (inside ``job.staging``; the core
    checks and publishes it) and the kernel images of it boot by default."""

    rootfs: Path
    kernel_ref: str | None = None
    #: recorded with the image (shown by ``image show``), e.g. the digest it came from
    details: dict[str, Any] = field(default_factory=dict)


class ImageSource(Protocol):
    """A source of images. ``name`` must match ``SOURCE_NAME_RE``."""

    name: str

    def claims(self, ref: str) -> bool:
        """Whether ``ref`` (what the user typed after ``image pull``) is this source's."""
        ...

    def image_name(self, ref: str) -> str:
        """The name the image gets in banger when pulled from ``ref``."""
        ...

    def revision(self, ref: str) -> str:
        """What a pull of ``ref`` would make now (a recipe revision, a digest): recorded
        with the image; when it changes, the image is stale and a pull rebuilds it."""
        ...

    def fetch(self, ref: str, job: SourceJob) -> Fetched:
        """Build or download the image into ``job.staging``; raise ``BangerError`` for
        what the user can act on."""
        ...
