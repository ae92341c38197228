"""The host-side recipes catalog entries name, and what identifies each one's output.

A catalog kernel or image built by a recipe records ``recipe:NAME/REVISION`` as its
source; when the recipe's revision moves on (a new banger changed how it builds),
what was built before is stale and ``pull`` rebuilds it. Builders are imported only
when a build runs, so listing stays cheap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger_core.artifacts.common import Log, Work


@dataclass(frozen=True)
class KernelRecipe:
    revision: Callable[[], str]
    # (dest, deb cache, log, cancel, work) -> manifest with absolute paths; work(done, total)
    # reports a long compile's progress
    build: Callable[[Path, Path, Log, threading.Event | None, Work | None], dict[str, Any]]


def _cloud_revision() -> str:
    from banger_core.artifacts import debian_kernel

    return str(debian_kernel.RECIPE)


def _cloud_build(dest: Path, cache: Path, log: Log, cancel: threading.Event | None, work: Work | None) -> dict[str, Any]:
    from banger_core.artifacts.debian_kernel import build_debian_cloud_kernel

    return build_debian_cloud_kernel(dest, cache=cache, log=log)


def _microvm_revision() -> str:
    from banger_core.artifacts import microvm_kernel

    return microvm_kernel.recipe_id()


def _microvm_build(dest: Path, cache: Path, log: Log, cancel: threading.Event | None, work: Work | None) -> dict[str, Any]:
    from banger_core.artifacts.microvm_kernel import build_microvm_kernel

    return build_microvm_kernel(dest, cache=cache, log=log, cancel=cancel, work=work)


@dataclass(frozen=True)
class ImageRecipe:
    revision: Callable[[], str]
    # (dest, the kernel's modules dir or None, log, cancel, work) -> manifest with an absolute rootfs
    build: Callable[[Path, Path | None, Log, threading.Event | None, Work | None], dict[str, Any]]


def _bookworm_revision() -> str:
    from banger_core.artifacts import debian_image

    return str(debian_image.RECIPE)


def _bookworm_build(
    dest: Path, modules: Path | None, log: Log, cancel: threading.Event | None, work: Work | None
) -> dict[str, Any]:
    from banger_core.artifacts.debian_image import build_debian_image

    return build_debian_image(dest, modules_dir=modules, log=log, cancel=cancel, work=work)


KERNELS: dict[str, KernelRecipe] = {
    "debian-cloud-kernel": KernelRecipe(_cloud_revision, _cloud_build),
    "debian-source-microvm": KernelRecipe(_microvm_revision, _microvm_build),
}
IMAGES: dict[str, ImageRecipe] = {"debian-bookworm": ImageRecipe(_bookworm_revision, _bookworm_build)}
