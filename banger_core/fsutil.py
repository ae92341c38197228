"""Small filesystem facts shared by image builders."""

from __future__ import annotations

import os
from pathlib import Path


def tree_bytes(root: Path) -> int:
    """Bytes the files under ``root`` occupy on disk (allocated blocks, no symlink follow)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total
