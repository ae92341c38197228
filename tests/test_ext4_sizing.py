"""Regression: an ext4 made from a ~1 GB tree of many small files at the default
sizing succeeds (the original tool ran out of inodes and space there): 120k files of
~7.5 KB (0.9 GB) through banger_core.images.ext4_from_tree, the step OCI pulls use."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from banger_core.images import ext4_from_tree

FILES, DIRS, SIZE = 120_000, 300, 8 * 1024 - 512


def test_many_small_files_fit_at_the_default_size():
    work = Path(tempfile.mkdtemp(prefix="bg-ext4-", dir="/var/tmp"))
    try:
        tree = work / "tree"
        data = os.urandom(SIZE)
        per = FILES // DIRS
        for d in range(DIRS):
            sub = tree / f"d{d:03}"
            sub.mkdir(parents=True)
            for f in range(per):
                with open(sub / f"f{f:04}", "wb") as fh:
                    fh.write(data)
        out = work / "rootfs.ext4"
        made = ext4_from_tree(tree, out)  # default sizing
        assert out.stat().st_size == made["size_mib"] << 20
        subprocess.run(["e2fsck", "-fn", str(out)], check=True, capture_output=True)
        info = subprocess.run(["dumpe2fs", "-h", str(out)], check=True, capture_output=True, text=True).stdout
        total = int(re.search(r"Inode count:\s+(\d+)", info).group(1))
        free = int(re.search(r"Free inodes:\s+(\d+)", info).group(1))
        assert total - free >= FILES + DIRS  # every file made it in
        # and room is left for the guest to use: at least a fifth of the inodes and blocks
        assert free >= total // 5, (free, total)
        blocks = int(re.search(r"Block count:\s+(\d+)", info).group(1))
        free_blocks = int(re.search(r"Free blocks:\s+(\d+)", info).group(1))
        assert free_blocks >= blocks // 5, (free_blocks, blocks)
        assert sorted(p.name for p in work.iterdir()) == ["rootfs.ext4", "tree"]  # no temp file left
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert not work.exists()
