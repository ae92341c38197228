#!/usr/bin/env python3
"""`banger image pull` from a local registry, against tar -x + mkfs.ext4 -d of the same layers.

The image (built here with umoci, pushed with skopeo to Debian's docker-registry on
127.0.0.1, see tests/oci_fixtures.py; gzip layers as umoci writes them):

    layer 1   the busybox tree of the OCI test image, plus bulk content: a copy of
              /usr/lib/python3.N (many small files) and of the test kernel's modules
              (/var/cache/banger-test/kernel/modules, fewer bigger files) where they
              exist, topped up with generated files (half random, half text) until
              the tree holds --tree-mb MB (default 160; the copies alone may be more)
    layer 2   the test image's second layer (two whiteouts, two new files) plus a
              5 MB file

Each round runs, interleaved so drift on the machine hits all of them alike:

    baseline       the layers, fetched once over HTTP into a temp dir (not timed),
                   `tar -x` of each in order into a dir, then `mkfs.ext4 -d` of that
                   dir into an image file of the size banger picked (timed together)
    banger cold    banger image pull 127.0.0.1:PORT/REPO:TAG --name bench-N, with
                   banger's blob cache emptied first: registry download + flatten + ext4
    banger warm    the same pull with the blobs left in banger's cache by the cold
                   pull (banger re-hashes them): flatten + ext4, like the baseline

The daemon is started (kernel import) and one pull + one baseline run as warm-up
before timing; each pulled image is deleted with `banger image delete` (not timed).
Reports seconds, MB/s of the flattened tree and of the compressed layers (MB = 1e6
bytes), ratios to the baseline, and the CLI's layer step lines (0.1 s resolution).
The baseline leaves layer 2's whiteouts as plain ``.wh.*`` files (tar knows no
whiteouts), a few bytes of difference; banger also copies its init and busybox into
the tree and removes its scratch tree before it returns (both in its time).

Config, state, cache and runtime dirs are fresh temp dirs; the registry, the daemon
and all temp dirs are stopped and removed at the end, also on error or Ctrl-C.
Needs docker-registry, umoci, skopeo, tar, mkfs.ext4 (and dumpe2fs for the check).

    .venv/bin/python benchmarks/image_import.py [--runs N] [--tree-mb MB] [--size 2G] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import guest_assets as ga
from leftovers import kill_processes_using
import oci_fixtures as of

from report import banger_env, print_table

BANGER = Path(sys.executable).parent / "banger"
REPO, TAG = "bench/bulk", "1"
STEP_RE = re.compile(r"^\[\s*([\d.]+)s\]\s+(?:download \S+ )?layer (\d+)/(\d+) ", re.M)
MODULES = Path("/var/cache/banger-test/kernel/modules")


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 1800) -> str:
    """Run a tool without proxies or REGISTRY_* overrides; raise with its output on failure."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"} and not k.startswith("REGISTRY_")
    }
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}: {(p.stdout + p.stderr).strip()[-2000:]}")
    return p.stdout


def tree_bytes(root: Path) -> tuple[int, int]:
    """(apparent bytes of regular files, number of entries) under root."""
    total = count = 0
    for dirpath, dirs, files in os.walk(root):
        count += len(dirs) + len(files)
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if not os.path.islink(os.path.join(dirpath, f)):
                total += st.st_size
    return total, count


# --- the image ----------------------------------------------------------------------------
def add_bulk(rootfs: Path, target: int) -> list[str]:
    """Copy real file trees into rootfs, then generate files until it holds ``target`` bytes."""
    sources: list[str] = []
    py = sorted(Path("/usr/lib").glob("python3.[0-9]*"))
    for src in [p for p in py if p.is_dir()][:1] + ([MODULES] if MODULES.is_dir() else []):
        dest = rootfs / ("usr/lib/modules" if src == MODULES else str(src).lstrip("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dest, symlinks=True, ignore_dangling_symlinks=True)
        sources.append(str(src))
    have, _ = tree_bytes(rootfs)
    rng = random.Random(1234)
    gen = rootfs / "opt/data"
    gen.mkdir(parents=True, exist_ok=True)
    i = 0
    words = [b"banger", b"image", b"layer", b"ext4", b"registry", b"kernel", b"guest", b"tree", b"\n"]
    while have < target:
        size = min(target - have, rng.choice([4 << 10, 64 << 10, 512 << 10, 2 << 20, 4 << 20]))
        if i % 2:
            data = rng.randbytes(size)
        else:
            data = b" ".join(rng.choice(words) for _ in range(size // 5 + 1))[:size]
        (gen / f"f{i:05d}.{'bin' if i % 2 else 'txt'}").write_bytes(data)
        have += size
        i += 1
    if i:
        sources.append(f"{i} generated files")
    return sources


def build_and_push(registry: str, work: Path, tree_mb: int) -> tuple[dict, list[str]]:
    """Build the two-layer image with umoci, push it with skopeo; (manifest, bulk sources)."""
    layout, bundle = work / "layout", work / "bundle"
    image = f"{layout}:{TAG}"
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", image])
    run(["umoci", "unpack", *rootless, "--image", image, str(bundle)])
    rootfs = bundle / "rootfs"
    of._populate_layer1(rootfs, of.find_static_busybox(), of.INIT_SCRIPT)  # the test image's layer 1
    sources = add_bulk(rootfs, tree_mb * 1_000_000)
    run(["umoci", "repack", "--refresh-bundle", "--history.created_by", "bench layer 1", "--image", image, str(bundle)])
    of._change_layer2(rootfs)  # whiteouts + new files, as in the test image
    (rootfs / "opt/layer2.bin").write_bytes(random.Random(2).randbytes(5_000_000))
    run(["umoci", "repack", "--history.created_by", "bench layer 2", "--image", image, str(bundle)])
    run(["umoci", "config", "--image", image, "--config.entrypoint", "/sbin/init", "--os", "linux", "--architecture", "amd64"])
    shutil.rmtree(bundle)
    run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
            f"oci:{layout}:{TAG}",
            f"docker://{registry}/{REPO}:{TAG}",
        ]
    )
    shutil.rmtree(layout)
    _, manifest, _ = of.fetch_manifest(registry, REPO, TAG)
    return manifest, sources


def ext4_used(image: Path) -> tuple[float, int]:
    """(MiB of used blocks, used inodes) of an ext4 image, from dumpe2fs -h."""
    out = run(["dumpe2fs", "-h", str(image)])
    f = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
    bs = int(f["Block size"])
    blocks = int(f["Block count"]) - int(f["Free blocks"])
    return blocks * bs / 2**20, int(f["Inode count"]) - int(f["Free inodes"])


# --- banger ------------------------------------------------------------------------------
class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = banger_env(root)
        for k in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            self.env.pop(k, None)  # the daemon is spawned with this env; registry is 127.0.0.1
        (root / "cfg").mkdir(parents=True)
        (root / "cfg" / "config.toml").write_text("[vmm]\naccel = 'tcg'\n")
        self.blobs = root / "cache" / "blobs"
        self.pulled: list[str] = []

    def banger(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [str(BANGER), *args], env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if r.returncode != 0:
            raise RuntimeError(f"banger {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
        return r

    def setup(self, kernel_dir: Path) -> None:
        # static_busybox() looks in cache/debs/busybox-static first: seed it, so no apt-get download
        bb = self.root / "cache" / "debs" / "busybox-static" / "bin" / "busybox"
        bb.parent.mkdir(parents=True)
        shutil.copy2(of.find_static_busybox(), bb)
        # the default kernel_ref of an OCI pull; importing it also starts the daemon
        self.banger("kernel", "import", "debian-cloud", "--from", str(kernel_dir))

    def pull(self, ref: str, name: str, size: str | None, cold: bool) -> dict[str, float]:
        if cold:
            shutil.rmtree(self.blobs, ignore_errors=True)
        argv = [str(BANGER), "image", "pull", ref, "--name", name, *(["--size", size] if size else [])]
        t0 = time.perf_counter()
        p = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"banger image pull {name} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
        self.pulled.append(name)
        if not cold and "cached)" not in p.stderr:
            raise RuntimeError(f"pull {name} was meant to reuse cached layers but downloaded them:\n{p.stderr}")
        res = {"wall": wall}
        steps = [(int(n), float(t)) for t, n, _ in STEP_RE.findall(p.stderr)]
        if steps:
            res["CLI start -> layer 1 line"] = steps[0][1]
        for (n, t), (_, t_next) in zip(steps, steps[1:], strict=False):
            res[f"layer {n} (download + flatten)"] = t_next - t
        if steps:
            res[f"layer {steps[-1][0]} + init + mkfs + CLI exit"] = wall - steps[-1][1]
        return res

    def rootfs(self, name: str) -> Path:
        return Path(json.loads(self.banger("image", "show", name, "--json").stdout)["rootfs"])

    def delete(self, name: str) -> None:
        self.banger("image", "delete", name)
        self.pulled.remove(name)

    def cleanup(self) -> list[str]:
        notes: list[str] = []
        for name in list(self.pulled):
            try:
                self.delete(name)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                notes.append(f"image delete {name} failed: {exc}")
        try:
            notes.append(self.banger("daemon", "stop", timeout=90).stdout.strip())
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            notes.append(f"daemon stop failed: {exc}")
        notes += [f"killed left-over process: {cmd}" for cmd in kill_processes_using(self.root)]
        return notes


# --- baseline ----------------------------------------------------------------------------
def baseline(layers: list[Path], work: Path, size_bytes: int, keep: bool = False) -> tuple[dict[str, float], Path]:
    """tar -x of each layer into a dir + mkfs.ext4 -d of it: ({wall, tar, mkfs, rm}, image)."""
    work.mkdir()
    tree, img = work / "tree", work / "rootfs.ext4"
    tree.mkdir()
    t0 = time.perf_counter()
    for layer in layers:
        run(["tar", "-x", "-p", "--numeric-owner", "-f", str(layer), "-C", str(tree)])
    t1 = time.perf_counter()
    with open(img, "wb") as fh:
        fh.truncate(size_bytes)
    run(["mkfs.ext4", "-q", "-F", "-L", "banger-root", "-d", str(tree), str(img)])
    t2 = time.perf_counter()
    shutil.rmtree(tree)
    res = {"wall": t2 - t0, "tar -x of the layers": t1 - t0, "mkfs.ext4 -d": t2 - t1, "rm": time.perf_counter() - t2}
    if not keep:
        shutil.rmtree(work)
    return res, img


def fetch_layers(registry: str, manifest: dict, dest: Path) -> float:
    """Download the layers once over HTTP into dest; seconds taken."""
    dest.mkdir()
    t0 = time.perf_counter()
    for i, layer in enumerate(manifest["layers"]):
        (dest / f"{i}.tar.gz").write_bytes(of.fetch_blob(registry, REPO, layer["digest"]))
    return time.perf_counter() - t0


# --- report ------------------------------------------------------------------------------
def row(metric: str, vals: list[float], ref: float | None = None, tree: int = 0, packed: int = 0) -> dict[str, object]:
    med = statistics.median(vals)
    return {
        "metric": metric,
        "n": len(vals),
        "min_s": round(min(vals), 3),
        "median_s": round(med, 3),
        "max_s": round(max(vals), 3),
        "tree_mb_s": round(tree / 1e6 / med, 1) if tree else None,
        "layers_mb_s": round(packed / 1e6 / med, 1) if packed else None,
        "ratio": round(med / ref, 2) if ref else None,
    }


def on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # same clean-up path as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds of baseline + cold pull + warm pull (default 3)")
    parser.add_argument("--tree-mb", type=int, default=160, help="MB of files in layer 1 (default 160)")
    parser.add_argument("--size", help="pass --size to banger (and use it for the baseline); default: banger's pick")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.tree_mb < 1:
        parser.error("--runs and --tree-mb must be at least 1")
    if not os.access(BANGER, os.X_OK):
        print(f"image_import: no banger at {BANGER}; run with the venv's python", file=sys.stderr)
        return 2
    missing = of.missing_tools() + [t for t in ("tar", "mkfs.ext4", "dumpe2fs") if shutil.which(t) is None]
    if missing:
        print(f"image_import: not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    kernel = ga.test_kernel(ga.default_cache_dir())

    signal.signal(signal.SIGTERM, on_sigterm)
    # Short path under /tmp: the daemon's Unix socket path is limited to 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="bgii-", dir="/tmp"))
    bench = Bench(root / "b")
    base: list[dict[str, float]] = []
    cold: list[dict[str, float]] = []
    warm: list[dict[str, float]] = []
    notes: list[str] = []
    meta: dict[str, object] = {}
    try:
        with of.registry() as reg:
            t = time.perf_counter()
            manifest, sources = build_and_push(reg, root / "img", args.tree_mb)
            meta["build_push_s"] = round(time.perf_counter() - t, 1)
            ref = f"{reg}/{REPO}:{TAG}"
            layers_dir = root / "layers"
            meta["http_fetch_s"] = round(fetch_layers(reg, manifest, layers_dir), 3)
            layers = sorted(layers_dir.iterdir())
            packed = sum(p.stat().st_size for p in layers)
            bench.setup(Path(kernel["kernel"]).parent)

            # warm-up (not timed): one pull, whose rootfs size the baseline copies, and one baseline
            n = 0
            bench.pull(ref, f"bench-{n}", args.size, cold=True)
            b_img = bench.rootfs(f"bench-{n}")
            size_bytes = b_img.stat().st_size
            b_used = ext4_used(b_img)
            bench.delete(f"bench-{n}")
            _, img = baseline(layers, root / "base-w", size_bytes, keep=True)
            ref_used = ext4_used(img)
            flat = root / "flat"  # the flattened tree's size, from one more extraction
            flat.mkdir()
            for layer in layers:
                run(["tar", "-x", "-p", "--numeric-owner", "-f", str(layer), "-C", str(flat)])
            tree, entries = tree_bytes(flat)
            shutil.rmtree(flat)
            shutil.rmtree(root / "base-w")

            for i in range(args.runs):
                base.append(baseline(layers, root / f"base{i}", size_bytes)[0])
                n += 1
                cold.append(bench.pull(ref, f"bench-{n}", args.size, cold=True))
                n += 1
                # while bench-(n-1) exists its layers stay cached (banger prunes layers no image uses)
                warm.append(bench.pull(ref, f"bench-{n}", args.size, cold=False))
                bench.delete(f"bench-{n - 1}")
                bench.delete(f"bench-{n}")
            log = bench.root / "state" / "bangerd.log"
            if log.exists():
                meta["daemon_starts"] = log.read_text().count(" listening on ")
    except KeyboardInterrupt:
        print("image_import: interrupted", file=sys.stderr)
        return 130
    finally:
        notes = bench.cleanup()
        shutil.rmtree(root, ignore_errors=True)

    ref_med = statistics.median(r["wall"] for r in base)
    results = []
    for label, runs in (
        ("baseline: tar -x layers + mkfs.ext4 -d", base),
        ("banger: image pull, cold blob cache", cold),
        ("banger: image pull, blobs cached", warm),
    ):
        results.append(row(label, [r["wall"] for r in runs], ref_med, tree, packed))
        keys = [k for k in runs[0] if k not in ("wall", "rm") and all(k in r for r in runs)]
        results += [row(f"  {k}", [r[k] for r in runs]) for k in keys]
    results += [
        row("info: rm -r of the baseline's tree (not in its time)", [r["rm"] for r in base]),
        row("info: HTTP GET of the layers, once (urllib, not in any time)", [meta["http_fetch_s"]], None, 0, packed),
    ]
    meta.update(
        {
            "runs": args.runs,
            "ref": "127.0.0.1:PORT/" + f"{REPO}:{TAG}",
            "bulk": sources,
            "layers": [{"size": lay["size"], "mediaType": lay["mediaType"]} for lay in manifest["layers"]],
            "tree_bytes": tree,
            "tree_entries": entries,
            "layers_bytes": packed,
            "image_bytes": size_bytes,
            "ext4_used": {
                "banger": {"mib": round(b_used[0], 1), "inodes": b_used[1]},
                "baseline": {"mib": round(ref_used[0], 1), "inodes": ref_used[1]},
            },
            "cleanup": notes,
            "loadavg": os.getloadavg(),
        }
    )
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return 0
    sizes = " + ".join(f"{lay['size'] / 1e6:.1f}" for lay in manifest["layers"])
    print(
        f"image:    2 gzip layers, {packed / 1e6:.1f} MB compressed ({sizes});"
        f" flattened {tree / 1e6:.1f} MB in {entries} entries; bulk: {', '.join(sources)}"
    )
    print(
        f"ext4:     {size_bytes / 2**20:.0f} MiB image; used: banger {b_used[0]:.1f} MiB / {b_used[1]} inodes,"
        f" baseline {ref_used[0]:.1f} MiB / {ref_used[1]} inodes"
    )
    print(
        f"rounds:   {args.runs} (baseline, cold pull, cached pull interleaved) after 1 warm-up each;"
        f" build + push {meta['build_push_s']} s"
    )
    print(
        "MB/s:     tree = flattened MB / median s, layers = compressed MB / median s; banger's sub-rows are"
        " from the CLI's step lines (0.1 s resolution)\n"
    )
    header = ["metric", "n", "min s", "median s", "max s", "tree MB/s", "layers MB/s", "x baseline"]
    rows = [
        [
            str(r["metric"]),
            str(r["n"]),
            f"{r['min_s']:.2f}",
            f"{r['median_s']:.2f}",
            f"{r['max_s']:.2f}",
            f"{r['tree_mb_s']:.1f}" if r["tree_mb_s"] is not None else "",
            f"{r['layers_mb_s']:.1f}" if r["layers_mb_s"] is not None else "",
            f"{r['ratio']:.2f}" if r["ratio"] is not None else "",
        ]
        for r in results
    ]
    print_table(header, rows)
    print(f"\ndaemon started {meta.get('daemon_starts', '?')}x; load avg at end {meta['loadavg'][0]:.2f}")
    print("cleanup: " + "; ".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
