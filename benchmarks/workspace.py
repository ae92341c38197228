#!/usr/bin/env python3
"""What `vm workspace prepare` and `vm workspace export` cost on a large repository,
against moving the same tree through the same channel (`vm exec`) by hand.

One isolated banger daemon, the default image (from the test suite's cache), TCG, one VM
(``--vcpu 1 --memory 1G``). The repository is made in a temp dir: FILES small text files
across 100 directories and a few binary ones (a few MB), committed, plus a few
uncommitted edits. Each round, in an order that alternates so drift hits both alike:

    prepare    banger vm workspace prepare VM REPO (HEAD's commit as a shallow .git, the
               working tree's content of the tracked files; the guest copy's index made)
    archive    git -C REPO archive HEAD | banger vm exec VM -- sh -c 'rm -rf /root/arch &&
               mkdir /root/arch && tar -x -C /root/arch' (the files alone, no .git)

then ~50 files edited in the guest's /root/repo (not timed), and

    export     banger vm workspace export VM > /dev/null (the binary patch of everything
               the guest changed, untracked files too, the guest's index untouched)
    git diff   banger vm exec VM -- git -C /root/repo diff --binary HEAD > /dev/null
    tar        banger vm exec VM -- tar -c -C /root/arch . > /dev/null (the whole tree back)

Wall times of the CLI; medians, and the ratios prepare / archive and export / each
baseline. The next round's prepare goes over a workspace whose changes were exported
(what a user's loop does: no --force). Nothing is asserted.

    .venv/bin/python benchmarks/workspace.py [--runs N] [--files N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import TEST_CACHE, banger_env, print_table

BANGER = Path(sys.executable).parent / "banger"
VM = "wsbench"
SPEC = ["--vcpu", "1", "--memory", "1G"]
DIRS = 100
EDITED = 50  # files the guest changes before each export
GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def banger(env: dict[str, str], *args: str, timeout: float = 1800, stdout: int | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [str(BANGER), *args],
        env=env,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0:
        raise RuntimeError(f"banger {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-800:]}")
    return r


def timed(env: dict[str, str], *args: str) -> float:
    t = time.monotonic()
    banger(env, *args, stdout=subprocess.DEVNULL)
    return time.monotonic() - t


def make_repo(top: Path, files: int) -> tuple[int, int]:
    """A repository of ``files`` small text files in DIRS directories and four binary
    files, committed, then three tracked files edited (not committed); (files, bytes)."""
    rng = random.Random(42)
    words = [f"w{i:03d}" for i in range(500)]
    total = 0
    top.mkdir(parents=True)
    for i in range(files):
        d = top / f"d{i % DIRS:03d}"
        d.mkdir(exist_ok=True)
        text = "\n".join(" ".join(rng.choices(words, k=12)) for _ in range(rng.randint(2, 12))) + "\n"
        (d / f"f{i:05d}.txt").write_text(text)
        total += len(text)
    (top / "bin").mkdir()
    for i in range(4):
        data = rng.randbytes(768 * 1024)
        (top / "bin" / f"blob{i}.bin").write_bytes(data)
        total += len(data)
    genv = {**os.environ, **GIT_ENV}
    for argv in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "generated tree"]):
        subprocess.run(["git", "-C", str(top), *argv], env=genv, check=True, capture_output=True)
    for i in range(3):
        with open(top / f"d{i:03d}" / f"f{i:05d}.txt", "a") as fh:
            fh.write("an uncommitted host edit\n")
    return files + 4, total


def archive(env: dict[str, str], top: Path) -> float:
    """The baseline of a prepare: HEAD's tree through `vm exec`'s stdin into /root/arch."""
    t = time.monotonic()
    git = subprocess.Popen(["git", "-C", str(top), "archive", "HEAD"], stdout=subprocess.PIPE)
    script = "rm -rf /root/arch && mkdir /root/arch && tar -x -C /root/arch"
    r = subprocess.run(
        [str(BANGER), "vm", "exec", VM, "--", "sh", "-c", script],
        env=env,
        stdin=git.stdout,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert git.stdout is not None
    git.stdout.close()
    if git.wait() != 0 or r.returncode != 0:
        raise RuntimeError(f"git archive | vm exec tar -x: git exited {git.returncode}, banger {r.returncode}: {r.stderr[-800:]}")
    return time.monotonic() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="rounds (each: prepare, archive, export and its baselines)")
    ap.add_argument("--files", type=int, default=5000, help="text files in the generated repository")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bgws-", dir="/tmp"))
    env = banger_env(root, cache=TEST_CACHE)
    (root / "cfg").mkdir()
    (root / "cfg" / "config.toml").write_text("[vmm]\naccel = 'tcg'\n")
    top = root / "repo"
    results: dict[str, list[float]] = {k: [] for k in ("prepare", "archive", "export", "git diff", "tar")}
    patch_bytes: list[int] = []
    try:
        t0 = time.monotonic()
        n_files, n_bytes = make_repo(top, args.files)
        print(f"repository: {n_files} files, {n_bytes / 1e6:.1f} MB, made in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        banger(env, "image", "pull", "debian-bookworm", timeout=3600)
        t0 = time.monotonic()
        banger(env, "vm", "create", "--name", VM, *SPEC)
        print(f"VM {VM} created in {time.monotonic() - t0:.1f}s (not measured)", file=sys.stderr)
        edited = [f"d{i % DIRS:03d}/f{i:05d}.txt" for i in range(0, args.files, max(1, args.files // EDITED))][:EDITED]
        edit = 'cd /root/repo && for f in "$@"; do echo "a guest edit" >> "$f"; done && echo new > guest-new.txt'
        first = timed(env, "vm", "workspace", "prepare", VM, str(top))  # the first one: not in the medians
        print(f"first prepare: {first:.2f}s (not in the medians)", file=sys.stderr)
        for i in range(args.runs):
            for what in ("prepare", "archive")[:: 1 if i % 2 == 0 else -1]:
                if what == "prepare":
                    results["prepare"].append(timed(env, "vm", "workspace", "prepare", VM, str(top)))
                else:
                    results["archive"].append(archive(env, top))
            banger(env, "vm", "exec", VM, "--", "sh", "-c", edit, "sh", *edited)
            for what in ("export", "git diff", "tar")[:: 1 if i % 2 == 0 else -1]:
                if what == "export":
                    patch = root / "changes.patch"
                    results["export"].append(timed(env, "vm", "workspace", "export", VM, "-o", str(patch)))
                    patch_bytes.append(patch.stat().st_size)
                elif what == "git diff":
                    results["git diff"].append(
                        timed(env, "vm", "exec", VM, "--", "git", "-C", "/root/repo", "diff", "--binary", "HEAD")
                    )
                else:
                    results["tar"].append(timed(env, "vm", "exec", VM, "--", "tar", "-c", "-C", "/root/arch", "."))
            print(
                f"round {i + 1}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items())
                + f", patch {patch_bytes[-1]} bytes",
                file=sys.stderr,
            )
    finally:
        r = subprocess.run([str(BANGER), "vm", "list", "--json"], env=env, capture_output=True, text=True, timeout=60)
        names = [v["name"] for v in json.loads(r.stdout or "[]")] if r.returncode == 0 else []
        if names:
            subprocess.run([str(BANGER), "vm", "delete", "--force", *names], env=env, capture_output=True, timeout=300)
        subprocess.run([str(BANGER), "daemon", "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    rows = []
    for key, what, base in (
        ("prepare", "vm workspace prepare", "archive"),
        ("archive", "  baseline: git archive | vm exec tar -x", None),
        ("export", f"vm workspace export ({EDITED} files + 1 new changed)", "git diff"),
        ("git diff", "  baseline: vm exec git diff --binary HEAD", None),
        ("tar", "  baseline: vm exec tar -c (the whole tree)", None),
    ):
        vals = results[key]
        rows.append(
            [what, f"{med[key]:.2f}", f"{min(vals):.2f}", f"{max(vals):.2f}", f"{med[key] / med[base]:.2f}" if base else ""]
        )
    print(
        f"workspace on a {n_files}-file, {n_bytes / 1e6:.1f} MB repository ({args.runs} rounds, TCG, 1 vCPU, 1 GiB, "
        f"seconds of wall time; the patch {statistics.median(patch_bytes):.0f} bytes)"
    )
    print_table(["what", "median", "min", "max", "ratio"], rows)
    print(
        f"prepare / archive: {med['prepare'] / med['archive']:.2f}x; export / git diff: {med['export'] / med['git diff']:.2f}x; "
        f"export / tar: {med['export'] / med['tar']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
