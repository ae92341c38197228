"""A Python interpreter for the agent disk, so the agent runs on any image: one with no
python3 at all (busybox, distroless, an OCI image of a static binary) or with one too
small for the agent (Debian's python3-minimal has no json, pty or tarfile).

It is assembled on the host from the host's ``/usr/bin/python3`` (``host_python``): the
binary, the dynamic loader and every shared library it and the extension modules it
needs link (``ldd`` says which; nothing is listed by hand), those extension modules
(``lib-dynload``), and a zip of the compiled pure-Python stdlib modules the agent imports.
Why the distribution's python3 and not the daemon's ``sys.executable``: the daemon runs
from a venv whose interpreter can be any build (here a pyenv one; elsewhere conda, a
shared-libpython build, a debug build), while ``/usr/bin/python3`` is the one
``install.sh`` installs with apt: a release build from the distribution, libpython
linked in, its libraries the system's, updated by the system's security updates (which
the cache key follows). The daemon's interpreter is used only on a host without
``/usr/bin/python3``; the assembly works the same for it.

Which modules: every module an ``import`` in the agent's code names (nested imports
too: found in its source, so it stays right as the agent grows), the ones it is about
to use (``REQUIRED``), one level of the imports those stdlib modules make lazily (what
``tarfile.open(mode="r:gz")`` or ``shutil`` reach for only when called), and ``runpy``;
the host's python imports them all (``-S``: no site-packages) and what its
``sys.modules`` then holds is what is shipped, plus the pure-Python codecs (the guest's
locale picks one at start-up). The same set (its top-level names) is the probe the run
script puts to an image's own python3 (``probe_modules``).

In the guest (``python/`` on the agent disk)::

    libs/ld-linux-x86-64.so.2 --library-path libs python3 -E -s -S -B -c ...

``python3`` finds its stdlib by itself: ``lib/python3X.zip`` beside the binary is
CPython's own landmark for a prefix, and ``lib/python3.X/lib-dynload`` its landmark for
the exec prefix, so no environment is needed and ``-E`` keeps the image's out. Nothing
else in the guest changes: the loader is run as a program, so no ``/lib64`` is needed and
the commands the agent starts see none of it.

Built once per (interpreter, agent code) under ``<cache>/agent/python-<key>/`` (a
staging dir renamed into place; a concurrent builder's finished copy is kept and ours
dropped) and reused; ``identity`` (the version and a hash of every file) goes into the
agent disk's id, so a new interpreter (a python3 or libc update on the host) makes a
new disk.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger_core.paths import Paths

HOST_PYTHON = Path("/usr/bin/python3")
#: what the agent is about to import (or may, through the modules it uses): shipped even
#: before its code says so
REQUIRED = (
    "tarfile", "pty", "tty", "termios", "fcntl", "ssl", "socket", "json", "selectors", "subprocess",
    "zlib", "hashlib", "shutil", "stat", "glob", "errno", "signal", "struct",
)  # fmt: skip
#: bump when the layout or the selection changes: the cache key and so the disk id follow
RECIPE = 1
AGENT_PACKAGE = "banger_guest"

# Run by the interpreter being assembled (python -E -s -S -B -c SCAN < request): which of
# the modules the request names it has, and what those of its stdlib import anywhere in
# their code (lazily too). Its own imports do not matter: LOAD runs in a fresh process.
SCAN = r"""
import ast, importlib, importlib.util, json, sys, sysconfig
req = json.load(sys.stdin)
def names_in(path, package):
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, ValueError):
        return set()
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                if node.level > len(parts):
                    continue
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base:
                found.add(base)
                found.update(base + "." + a.name for a in node.names if a.name != "*")
    return found
direct, lazy = [], set()
for name in sorted(set(req["modules"])):
    try:
        spec = importlib.util.find_spec(name)
    except BaseException:
        spec = None
    if spec is None:
        continue
    direct.append(name)
    if (spec.origin or "").endswith(".py"):
        pkg = name if spec.submodule_search_locations is not None else name.rpartition(".")[0]
        lazy |= names_in(spec.origin, pkg)
print(json.dumps({
    "version": sys.version.split()[0],
    "major_minor": "%d.%d" % sys.version_info[:2],
    "zip_name": "python%d%d.zip" % sys.version_info[:2],
    "platlibdir": getattr(sys, "platlibdir", "lib"),
    "stdlib": sysconfig.get_path("stdlib"),
    "builtin_zlib": "zlib" in sys.builtin_module_names,
    "direct": direct,
    "lazy": sorted(lazy - set(direct)),
}))
"""

# Run by the same interpreter in a fresh process (python -E -s -S -B -c LOAD NAME..):
# imports what it is given (what cannot be imported here is skipped: another platform's)
# and the pure-Python codecs, then says what sys.modules holds and from which files.
# Nothing is imported before the snapshot that the interpreter's start-up did not.
LOAD = r"""
import sys
for name in sys.argv[1:]:
    try:
        __import__(name)
    except BaseException:
        pass
import encodings, os
ext = (".so", ".pyd")
for f in sorted(os.listdir(encodings.__path__[0])):
    if not f.endswith(".py") or f == "__init__.py":
        continue
    before = set(sys.modules)
    try:
        __import__("encodings." + f[:-3])
    except BaseException:
        pass
    new = set(sys.modules) - before
    if any((getattr(sys.modules[m], "__file__", None) or "").endswith(ext) for m in new):
        for m in new:  # a codec with an extension module of its own (the CJK ones): not shipped
            del sys.modules[m]
mods = []
for name, mod in sorted(sys.modules.items()):
    spec = getattr(mod, "__spec__", None)
    origin = getattr(spec, "origin", None)
    file = getattr(mod, "__file__", None)
    if name == "__main__" or name in sys.builtin_module_names or origin in ("built-in", "frozen") or not file:
        continue
    mods.append([name, file])
import json
print(json.dumps(mods))
"""

# Run by the same interpreter: compile the sources into the zip (its own bytecode).
ZIP = r"""
import importlib.util, json, sys, zipfile
req = json.load(sys.stdin)
method = zipfile.ZIP_DEFLATED if req["deflate"] else zipfile.ZIP_STORED
with zipfile.ZipFile(req["out"], "w", method) as z:
    for src, arc in req["files"]:
        with open(src, "rb") as fh:
            source = fh.read()
        code = compile(source, arc[:-1], "exec", dont_inherit=True, optimize=0)
        data = importlib._bootstrap_external._code_to_hash_pyc(code, importlib.util.source_hash(source), False)
        z.writestr(zipfile.ZipInfo(arc, (1980, 1, 1, 0, 0, 0)), data, method)
"""


class InterpreterError(RuntimeError):
    pass


@dataclass(frozen=True)
class Interpreter:
    """An assembled interpreter: its directory (copied onto the agent disk as ``python/``)."""

    root: Path
    version: str
    digest: str  # sha256 over every file's path and bytes
    probe: tuple[str, ...]  # the top-level modules the agent uses: what an image's python3 must import

    @property
    def identity(self) -> str:
        return f"{self.version}-{self.digest[:16]}"

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file() and not p.is_symlink())


def host_python() -> Path:
    """The python3 the interpreter is assembled from (see the module doc for why)."""
    if os.access(HOST_PYTHON, os.X_OK):
        return HOST_PYTHON.resolve()
    return Path(getattr(sys, "_base_executable", None) or sys.executable).resolve()


def agent_imports(sources: dict[str, bytes]) -> set[str]:
    """The modules the agent's code imports anywhere (nested imports too), its own
    package left out; ``from X import Y`` names both X and X.Y (Y may be a submodule)."""
    found: set[str] = set()
    for name, data in sources.items():
        for node in ast.walk(ast.parse(data, filename=name)):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
    return {n for n in found if n.split(".")[0] != AGENT_PACKAGE}


def _run_python(python: Path, script: str, request: dict[str, object] | None = None, args: list[str] | None = None) -> str:
    try:
        r = subprocess.run(
            [str(python), "-E", "-s", "-S", "-B", "-c", script, *(args or [])],
            input=json.dumps(request or {}),
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InterpreterError(f"cannot run {python}: {exc}") from None
    if r.returncode != 0:
        raise InterpreterError(f"{python} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout


def scan(python: Path, sources: dict[str, bytes]) -> dict[str, Any]:
    """What ``python`` is and loads for the agent whose code is ``sources`` (SCAN, then
    LOAD): ``modules`` is [[name, file]] of every module to ship, ``direct`` the modules
    the agent imports (and REQUIRED) that it has."""
    imports = agent_imports(sources)
    must = {n for n in imports if "." not in n} | set(REQUIRED)
    info: dict[str, Any] = json.loads(_run_python(python, SCAN, {"modules": sorted(imports | must | {"runpy"})}))
    missing = sorted(must - set(info["direct"]))
    if missing:
        raise InterpreterError(f"{python} cannot import {', '.join(missing)} (the agent uses them)")
    info["modules"] = json.loads(_run_python(python, LOAD, args=[*info["direct"], *info["lazy"]]))
    return info


_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(\S+)\s+\(0x[0-9a-f]+\)\s*$")


def shared_libraries(elf: Path) -> tuple[dict[str, Path], Path | None]:
    """({soname: file} of what ``elf`` links, transitively, and its dynamic loader), as ldd says."""
    try:
        r = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, timeout=60, env={"LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InterpreterError(f"ldd {elf}: {exc}") from None
    if r.returncode != 0 and "not a dynamic executable" in (r.stdout + r.stderr):
        return {}, None  # static
    libs: dict[str, Path] = {}
    loader = None
    for line in r.stdout.splitlines():
        if "not found" in line:
            raise InterpreterError(f"ldd {elf}: {line.strip()}")
        m = _LDD_LINE.match(line)
        if not m:
            continue
        name, path = m.group(1), m.group(2)
        if name is None:
            if path.startswith("/"):  # the loader: no "=>"
                loader = Path(path)
            continue  # linux-vdso.so.1 and friends: the kernel's
        libs[name] = Path(path)
    if r.returncode != 0:
        raise InterpreterError(f"ldd {elf} failed: {r.stderr.strip()}")
    return libs, loader


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            h.update(str(p.relative_to(root)).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def assemble(python: Path, sources: dict[str, bytes], out: Path) -> dict[str, Any]:
    """Assemble the interpreter into the empty dir ``out``; returns its manifest (also
    written as ``out/manifest.json``): version, digest, probe, and the host files it was
    made from with their stat (``_fresh`` compares them)."""
    info = scan(python, sources)
    mm, stdlib = str(info["major_minor"]), Path(str(info["stdlib"]))
    platlib = out / str(info["platlibdir"])
    dynload = platlib / f"python{mm}" / "lib-dynload"
    libdir = out / "libs"
    out.chmod(0o755)  # a staging dir is 0700
    dynload.mkdir(parents=True)
    libdir.mkdir()
    shutil.copyfile(python, out / "python3")
    (out / "python3").chmod(0o755)
    elves = [python]
    zipped: list[tuple[str, str]] = []
    modules: list[list[str]] = info["modules"]
    for name, filename in modules:
        file = Path(filename)
        try:
            rel = file.relative_to(stdlib)
        except ValueError:
            raise InterpreterError(f"{python}: module {name} ({file}) is not in its stdlib {stdlib}") from None
        if file.suffix == ".py":
            zipped.append((str(file), str(rel) + "c"))
        elif rel.parts[0] == "lib-dynload" and len(rel.parts) == 2:
            shutil.copyfile(file, dynload / file.name)
            elves.append(file)
        else:
            raise InterpreterError(f"{python}: module {name} is neither source nor in lib-dynload ({file})")
    _run_python(
        python, ZIP, {"out": str(platlib / str(info["zip_name"])), "files": sorted(zipped), "deflate": info["builtin_zlib"]}
    )
    needed: dict[str, Path] = {}
    loader = None
    for elf in elves:
        libs, ld = shared_libraries(elf)
        needed.update(libs)
        loader = loader or ld
    if loader is None:
        raise InterpreterError(f"ldd names no dynamic loader for {python}")
    needed[loader.name] = loader
    for soname, lib in sorted(needed.items()):
        shutil.copyfile(lib.resolve(), libdir / soname)
        (libdir / soname).chmod(0o755)
    (out / "ld.so").symlink_to(f"libs/{loader.name}")
    (out / "version").write_text(f"{info['version']}\n")
    hosts = sorted({str(p) for p in [*elves, *needed.values()]})
    probe = sorted({n.split(".")[0] for n in info["direct"]} - {"runpy"})
    manifest: dict[str, Any] = {
        "version": info["version"],
        "python": str(python),
        "loader": loader.name,
        "digest": _digest(out),
        "probe": probe,
        "host_files": {p: _stat_key(Path(p)) for p in hosts},
        "modules": [name for name, _ in modules],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _fresh(manifest: dict[str, object]) -> bool:
    """The host files it was made from are as they were (no apt upgrade since)."""
    try:
        files: dict[str, list[int]] = manifest["host_files"]  # type: ignore[assignment]
        return all(_stat_key(Path(p)) == k for p, k in files.items())
    except (OSError, KeyError, TypeError):
        return False


def _load(root: Path) -> Interpreter | None:
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not _fresh(m):
        return None
    return Interpreter(root, m["version"], m["digest"], tuple(m["probe"]))


def cache_key(python: Path, sources: dict[str, bytes]) -> str:
    """What the assembly depends on that is cheap to know: the interpreter binary, the
    agent's code, the required modules and this recipe (the libraries it links are
    checked against the manifest)."""
    h = hashlib.sha256(json.dumps([RECIPE, str(python), _stat_key(python), REQUIRED, SCAN, ZIP]).encode())
    for name, data in sorted(sources.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


_lock = threading.Lock()


def ensure(where: Path, sources: dict[str, bytes], python: Path | None = None) -> Interpreter:
    """The interpreter for this agent under ``where`` (``python-<key>``), assembled if
    missing or stale. Concurrent callers in this process wait for one build; another
    process building the same one at the same time loses nothing: the first rename
    wins, and the other's copy is dropped."""
    python = python or host_python()
    final = where / f"python-{cache_key(python, sources)}"
    with _lock:
        found = _load(final)
        if found is None:
            staging = Paths.staging_dir(final)
            try:
                assemble(python, sources, staging)
                try:
                    staging.rename(final)  # fails if another process put one there first
                except OSError:
                    if _load(final) is None:  # a stale one: replace it
                        from banger_core import fsutil

                        fsutil.replace_dir(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            found = _load(final)
            if found is None:
                raise InterpreterError(f"the interpreter assembled in {final} does not load")
        return found


#: how the guest starts the bundled interpreter: flags, then code that runs the agent as
#: ``-m banger_guest.agent`` would, from the package dir given as its first argument
#: (``-E`` and ``-S`` shut out the image's PYTHON* variables and site-packages)
FLAGS = ("-E", "-s", "-S", "-B")
RUN_CODE = (
    "import sys, runpy; sys.path[0] = sys.argv.pop(1); "
    'runpy.run_module("banger_guest.agent", run_name="__main__", alter_sys=True)'
)


def run_argv(root: str, agent_dir: str) -> list[str]:
    """The command line that runs the agent in ``agent_dir`` on the interpreter in
    ``root`` (what the run script execs)."""
    return [f"{root}/ld.so", "--library-path", f"{root}/libs", f"{root}/python3", *FLAGS, "-c", RUN_CODE, agent_dir]
