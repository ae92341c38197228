"""Test infrastructure for the OCI image puller: a local registry and a test image.

Everything here uses Debian's packages ``docker-registry`` (distribution 2.8),
``umoci`` and ``skopeo`` (``apt-get install -y docker-registry umoci skopeo``) and
talks only to 127.0.0.1.

Plain functions
    registry(token_auth=False)       context manager: a throw-away registry,
                                     yields "127.0.0.1:PORT" (plain HTTP, no auth;
                                     token_auth=True: anonymous bearer tokens)
    fetch_manifest(), fetch_blob()   plain GETs against it (never through a proxy)
    build_test_layout(workdir, ...)  an OCI image layout (umoci) of the test image
    push_test_image(registry, ...)   build + push it, returns what a pull must give
    push_multiarch_index(registry, ...)  an OCI image index: linux/amd64 + linux/arm64
    push_layers(registry, repo, tag, layers, workdir)  an image of raw layer tars, pushed as is
    find_static_busybox()            a statically linked busybox binary
    missing_tools()                  which of the needed programs are absent

Pytest fixtures (import them into a test module or conftest.py)
    oci_registry       session: "127.0.0.1:PORT" (a RegistryAddress, a str)
    oci_token_registry session: the same, behind anonymous bearer-token auth
    oci_test_image     session: push_test_image(oci_registry) result (gzip layers)

The test image (one manifest, linux/amd64, entrypoint /sbin/init)
    layer 1  (umoci repack) /bin/busybox + applet symlinks sh ls cat echo mount
             poweroff sleep, empty /dev /proc /sys /tmp,
             /etc/os-release "ID=bangertest", /etc/removed-later,
             /opt/keep/a, /opt/opaque/old, /sbin/init (a shell script that prints
             BANGER-OCI-BOOT to /dev/console, then `exec sleep 100000`)
    layer 2  made by a second ``umoci repack`` and then rewritten here:
             - etc/.wh.removed-later   whiteout, written by umoci itself
             - etc/layer2              "2\\n"
             - opt/opaque/.wh..wh..opq opaque-directory marker.  umoci 0.4.7 never
               writes one: for a directory removed and recreated it writes one
               plain whiteout per vanished entry (opt/opaque/.wh.old).  So that
               entry is replaced by ``.wh..wh..opq`` in the tar, and the blob,
               the config's diff_id, the manifest and index.json are rewritten
               with the new digests and sizes.
             - opt/opaque/new          "new\\n"

Layer compression: umoci writes gzip (``application/vnd.oci.image.layer.v1.tar+gzip``).
``compression="zstd"`` recompresses every layer with zstandard
(``...tar+zstd``), ``"mixed"`` makes layer 1 zstd and layer 2 gzip.  This is
done in the layout rather than with ``skopeo copy --dest-compress-format zstd``,
because skopeo 1.9.3 leaves layers that are already compressed as they are
(and its blob-info cache would hand back the gzip blob anyway).  Pushes use
``--preserve-digests``, so the registry gets the layout's manifest byte for byte.

What docker-registry 2.8 does that a puller must cope with
    - an OCI manifest or index is answered 404 MANIFEST_UNKNOWN ("OCI manifest
      found, but accept header does not support OCI manifests") unless Accept
      names its media type; no Accept header at all gets the same 404.
    - umoci's manifests carry no "mediaType" field: use the Content-Type header.
    - blobs are served directly (200, no redirect) from the filesystem driver.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BUSYBOX_CACHE = Path("/var/cache/banger-test/debs")
APPLETS = ("sh", "ls", "cat", "echo", "mount", "poweroff", "sleep")
BOOT_MARKER = "BANGER-OCI-BOOT"
DEFAULT_REPO = "banger/busybox"

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MANIFEST_ACCEPT = ", ".join(
    [
        MT_MANIFEST,
        "application/vnd.docker.distribution.manifest.v2+json",
        MT_INDEX,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)

OPAQUE = ".wh..wh..opq"
INIT_SCRIPT = f"""#!/bin/sh
echo {BOOT_MARKER} > /dev/console
exec sleep 100000
"""

# What a correct pull of the test image must (not) contain, as absolute paths.
EXPECT_PRESENT = [
    "/bin/busybox",
    *(f"/bin/{a}" for a in APPLETS),
    "/etc/os-release",
    "/etc/layer2",
    "/opt/keep/a",
    "/opt/opaque/new",
    "/sbin/init",
]
EXPECT_ABSENT = [
    "/etc/removed-later",
    "/opt/opaque/old",
    "/etc/.wh.removed-later",
    f"/opt/opaque/{OPAQUE}",
    "/opt/opaque/.wh.old",
]
EXPECT_FILES = {
    "/etc/os-release": "ID=bangertest\n",
    "/etc/layer2": "2\n",
    "/opt/keep/a": "a\n",
    "/opt/opaque/new": "new\n",
    "/sbin/init": INIT_SCRIPT,
}
EXPECT_SYMLINKS = {f"/bin/{a}": "busybox" for a in APPLETS}


class OciFixtureError(RuntimeError):
    pass


# --------------------------------------------------------------------------- tools


def find_registry_binary() -> str | None:
    found = shutil.which("docker-registry")
    if found:
        return found
    return "/usr/bin/docker-registry" if os.access("/usr/bin/docker-registry", os.X_OK) else None


def missing_tools() -> list[str]:
    """The programs this module needs that are not installed (empty when all are)."""
    missing = [] if find_registry_binary() else ["docker-registry"]
    missing += [t for t in ("umoci", "skopeo") if shutil.which(t) is None]
    return missing


def _clean_env() -> dict[str, str]:
    """The environment without proxies and without REGISTRY_* config overrides."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    return {k: v for k, v in os.environ.items() if k.lower() not in drop and not k.startswith("REGISTRY_")}


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise OciFixtureError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0):
    """GET without any proxy (the URL is always 127.0.0.1)."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"only 127.0.0.1 may be contacted, not {url}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout)


def fetch_manifest(registry: str, repo: str, ref: str, headers: dict | None = None) -> tuple[str, dict, str]:
    """(media type, parsed manifest, Docker-Content-Digest) of REPO:REF on the registry.

    headers: extra ones, e.g. {"Authorization": "Bearer x"} for a token_auth registry.
    """
    hdrs = {"Accept": MANIFEST_ACCEPT, **(headers or {})}
    with _http_get(f"http://{registry}/v2/{repo}/manifests/{ref}", hdrs) as r:
        body = r.read()
        return r.headers.get("Content-Type", ""), json.loads(body), r.headers.get("Docker-Content-Digest", "")


def fetch_blob(registry: str, repo: str, digest: str, headers: dict | None = None) -> bytes:
    with _http_get(f"http://{registry}/v2/{repo}/blobs/{digest}", headers, timeout=30) as r:
        return r.read()


# ------------------------------------------------------------------------ registry


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _registry_config(port: int, storage: Path, token_realm: str | None) -> str:
    auth = (
        f"""auth:
  silly:
    realm: {token_realm}
    service: {TOKEN_SERVICE}
"""
        if token_realm
        else ""
    )
    return f"""version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: banger-test-registry-secret
health:
  storagedriver:
    enabled: false
{auth}"""


TOKEN_SERVICE = "banger-test"


class RegistryAddress(str):
    """ "127.0.0.1:PORT", plus what a test may want to look at.

    log_path        the registry's log (access log included); gone after exit
    token_realm     the token endpoint's URL, or None without token auth
    token_requests  one dict per GET on the token endpoint: {"path", "query"
                    (parsed, lists of values), "authorization" (header or None)}
    """

    log_path: Path
    token_realm: str | None
    token_requests: list[dict]


@contextlib.contextmanager
def _token_server() -> Iterator[tuple[str, list[dict]]]:
    """An anonymous token endpoint on 127.0.0.1: any GET gets a bearer token."""
    import http.server
    import threading
    import urllib.parse

    requests: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            requests.append(
                {
                    "path": url.path,
                    "query": urllib.parse.parse_qs(url.query),
                    "authorization": self.headers.get("Authorization"),
                }
            )
            token = f"banger-test-token-{len(requests)}"
            body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def registry(timeout: float = 30.0, token_auth: bool = False) -> Iterator[RegistryAddress]:
    """Run ``docker-registry serve`` on 127.0.0.1:<free port>; yield "127.0.0.1:PORT".

    Plain HTTP, filesystem storage in a temporary directory that is removed
    (after the registry is stopped) on exit.  A registry that fails to come up
    raises OciFixtureError with its log.

    token_auth=False: no authentication at all (GET /v2/ answers 200).
    token_auth=True: distribution's "silly" access controller: every request
    without an Authorization header gets 401 with ``WWW-Authenticate: Bearer
    realm="http://127.0.0.1:TPORT/token",service="banger-test"[,scope=...]``,
    and the realm is a small in-process endpoint that hands anyone a token.
    NB: the registry accepts *any* Authorization header (it cannot check the
    token); see RegistryAddress.token_requests for what the client asked for.
    """
    binary = find_registry_binary()
    if binary is None:
        raise OciFixtureError("docker-registry is not installed (apt-get install docker-registry)")
    tmp = Path(tempfile.mkdtemp(prefix="banger-oci-registry-"))
    proc: subprocess.Popen | None = None
    with contextlib.ExitStack() as stack:
        realm, token_requests = stack.enter_context(_token_server()) if token_auth else (None, [])
        ready_headers = {"Authorization": "Bearer readiness-probe"} if token_auth else {}
        try:
            for _attempt in range(3):  # the free port may be taken between probe and bind
                port = _free_port()
                config = tmp / "config.yml"
                config.write_text(_registry_config(port, tmp / "storage", realm))
                with open(tmp / "registry.log", "wb") as log:
                    proc = subprocess.Popen(
                        [binary, "serve", str(config)],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=_clean_env(),
                        start_new_session=True,
                    )
                deadline = time.monotonic() + timeout
                while proc.poll() is None and time.monotonic() < deadline:
                    try:
                        with _http_get(f"http://127.0.0.1:{port}/v2/", ready_headers, timeout=1) as r:
                            if r.status == 200:
                                break
                    except (urllib.error.URLError, ConnectionError, OSError):
                        pass
                    time.sleep(0.05)
                else:
                    text = (tmp / "registry.log").read_text(errors="replace")
                    if proc.poll() is not None and "address already in use" in text:
                        continue
                    raise OciFixtureError(f"docker-registry did not answer on 127.0.0.1:{port}:\n{text[-4000:]}")
                break
            else:
                raise OciFixtureError("docker-registry: no free port after 3 tries")
            address = RegistryAddress(f"127.0.0.1:{port}")
            address.log_path = tmp / "registry.log"
            address.token_realm = realm
            address.token_requests = token_requests
            yield address
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- image


def find_static_busybox() -> Path:
    """A static busybox: the test cache's, else banger's own finder (may use apt)."""
    for candidate in sorted(BUSYBOX_CACHE.glob("**/bin/busybox")):
        if candidate.is_file():
            return candidate
    from banger_debian.debian_kernel import static_busybox

    return static_busybox(BUSYBOX_CACHE)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Layout:
    """Minimal read/write access to an OCI image layout's blobs."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.root / "blobs" / algo / hexd

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def read_json(self, digest: str) -> dict:
        return json.loads(self.read(digest))

    def write(self, data: bytes) -> tuple[str, int]:
        digest = _sha256(data)
        self.path(digest).write_bytes(data)
        return digest, len(data)

    def write_json(self, obj: dict) -> tuple[str, int]:
        return self.write(json.dumps(obj, separators=(",", ":")).encode())

    def index(self) -> dict:
        return json.loads((self.root / "index.json").read_text())

    def set_index(self, index: dict) -> None:
        (self.root / "index.json").write_text(json.dumps(index, separators=(",", ":")))

    def tag_entry(self, tag: str) -> dict:
        for entry in self.index()["manifests"]:
            if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return entry
        raise OciFixtureError(f"tag {tag!r} not in {self.root}/index.json")

    def retag(self, tag: str, media_type: str, digest: str, size: int, **extra) -> None:
        index = self.index()
        index["manifests"] = [
            m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
        ]
        index["manifests"].append(
            {
                "mediaType": media_type,
                "digest": digest,
                "size": size,
                **extra,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        )
        self.set_index(index)


def _decompress(data: bytes, media_type: str) -> bytes:
    if media_type.endswith("+gzip"):
        return gzip.decompress(data)
    if media_type.endswith("+zstd"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _compress(tar: bytes, how: str) -> tuple[bytes, str]:
    if how == "gzip":
        return gzip.compress(tar, mtime=0), MT_LAYER_GZIP
    if how == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(tar), MT_LAYER_ZSTD
    raise ValueError(f"unknown compression {how!r}")


def _opaque_rewrite(tar: bytes) -> bytes:
    """Replace umoci's per-entry whiteouts under opt/opaque/ by one opaque marker."""
    out = io.BytesIO()
    marker_written = False
    with tarfile.open(fileobj=io.BytesIO(tar)) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            name = member.name[2:] if member.name.startswith("./") else member.name
            if name.startswith("opt/opaque/") and not marker_written:
                marker = tarfile.TarInfo(f"opt/opaque/{OPAQUE}")
                marker.mode = 0o644
                dst.addfile(marker)
                marker_written = True
            if name.startswith("opt/opaque/.wh.") and name != f"opt/opaque/{OPAQUE}":
                continue  # umoci's plain whiteout for opt/opaque/old
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
        if not marker_written:
            raise OciFixtureError("umoci's layer 2 has nothing under opt/opaque/")
    return out.getvalue()


def _populate_layer1(rootfs: Path, busybox: Path, init_script: str) -> None:
    for d in ("bin", "sbin", "etc", "opt/keep", "opt/opaque", "dev", "proc", "sys", "tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, rootfs / "bin/busybox")
    (rootfs / "bin/busybox").chmod(0o755)
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc/os-release").write_text("ID=bangertest\n")
    (rootfs / "etc/removed-later").write_text("this file is whited out by layer 2\n")
    (rootfs / "opt/keep/a").write_text("a\n")
    (rootfs / "opt/opaque/old").write_text("old\n")
    (rootfs / "sbin/init").write_text(init_script)
    (rootfs / "sbin/init").chmod(0o755)


def _change_layer2(rootfs: Path) -> None:
    (rootfs / "etc/removed-later").unlink()
    shutil.rmtree(rootfs / "opt/opaque")
    (rootfs / "opt/opaque").mkdir()
    (rootfs / "opt/opaque/new").write_text("new\n")
    (rootfs / "etc/layer2").write_text("2\n")


def build_test_layout(
    workdir: Path, tag: str = "1", compression: str = "gzip", init_script: str = INIT_SCRIPT
) -> tuple[Path, str]:
    """Build the test image as an OCI layout in ``workdir/layout``; (layout, manifest digest).

    compression: "gzip" (both layers gzip), "zstd" (both zstd) or "mixed"
    (layer 1 zstd, layer 2 gzip).
    """
    if compression not in ("gzip", "zstd", "mixed"):
        raise ValueError(f"compression must be gzip, zstd or mixed, not {compression!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    layout, bundle = workdir / "layout", workdir / "bundle"
    shutil.rmtree(layout, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    image = f"{layout}:{tag}"

    _run(["umoci", "init", "--layout", str(layout)])
    _run(["umoci", "new", "--image", image])
    _run(["umoci", "unpack", *rootless, "--image", image, str(bundle)])
    _populate_layer1(bundle / "rootfs", find_static_busybox(), init_script)
    _run(["umoci", "repack", "--refresh-bundle", "--history.created_by", "banger test layer 1", "--image", image, str(bundle)])
    _change_layer2(bundle / "rootfs")
    _run(["umoci", "repack", "--history.created_by", "banger test layer 2", "--image", image, str(bundle)])
    _run(
        ["umoci", "config", "--image", image, "--config.entrypoint", "/sbin/init",
         "--config.env", "PATH=/bin:/sbin", "--os", "linux", "--architecture", "amd64"]
    )  # fmt: skip
    shutil.rmtree(bundle, ignore_errors=True)

    # Rewrite layer 2 (opaque marker) and recompress as asked; fix up config, manifest, index.
    blobs = _Layout(layout)
    entry = blobs.tag_entry(tag)
    manifest = blobs.read_json(entry["digest"])
    config = blobs.read_json(manifest["config"]["digest"])
    wanted = {"gzip": ["gzip", "gzip"], "zstd": ["zstd", "zstd"], "mixed": ["zstd", "gzip"]}[compression]
    if len(manifest["layers"]) != 2:
        raise OciFixtureError(f"umoci made {len(manifest['layers'])} layers, expected 2")
    for i, layer in enumerate(manifest["layers"]):
        tar = _decompress(blobs.read(layer["digest"]), layer["mediaType"])
        if i == 1:
            tar = _opaque_rewrite(tar)
        data, media_type = _compress(tar, wanted[i])
        digest, size = blobs.write(data)
        manifest["layers"][i] = {"mediaType": media_type, "digest": digest, "size": size}
        config["rootfs"]["diff_ids"][i] = _sha256(tar)
    cdigest, csize = blobs.write_json(config)
    manifest["config"] = {"mediaType": MT_CONFIG, "digest": cdigest, "size": csize}
    mdigest, msize = blobs.write_json(manifest)
    blobs.retag(tag, MT_MANIFEST, mdigest, msize)
    _run(["umoci", "gc", "--layout", str(layout)])
    return layout, mdigest


def _skopeo_push(layout: Path, src_tag: str, dest: str, all_images: bool = False, workdir: Path | None = None) -> str:
    digestfile = Path(tempfile.mkstemp(prefix="digest-", dir=workdir)[1])
    try:
        _run(
            ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
             *(["--all"] if all_images else []), "--digestfile", str(digestfile),
             f"oci:{layout}:{src_tag}", f"docker://{dest}"]
        )  # fmt: skip
        return digestfile.read_text().strip()
    finally:
        digestfile.unlink(missing_ok=True)


def _check_registry(registry: str) -> None:
    if not registry.startswith("127.0.0.1:"):
        raise ValueError(f"only a registry on 127.0.0.1 may be used, not {registry!r}")


def push_test_image(
    registry: str,
    repo: str = DEFAULT_REPO,
    tag: str = "1",
    workdir: Path | None = None,
    *,
    compression: str = "gzip",
    init_script: str = INIT_SCRIPT,
) -> dict:
    """Build the test image and push it to REGISTRY/REPO:TAG; say what a pull must give.

    Returns {"ref", "digest" (manifest digest, as the registry has it), "media_type",
    "layers" ([{mediaType, digest, size}]), "config_digest", "expect_present",
    "expect_absent", "expect_files" ({path: text}), "expect_symlinks" ({path: target}),
    "boot_marker"}.  Without workdir a temporary one is used and removed.
    """
    _check_registry(registry)
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="banger-oci-image-")) if workdir is None else Path(workdir)
    try:
        layout, mdigest = build_test_layout(work, tag, compression, init_script)
        pushed = _skopeo_push(layout, tag, f"{registry}/{repo}:{tag}", workdir=work)
        if pushed != mdigest:
            raise OciFixtureError(f"skopeo pushed {pushed}, the layout has {mdigest}")
        manifest = _Layout(layout).read_json(mdigest)
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "ref": f"{registry}/{repo}:{tag}",
        "digest": mdigest,
        "media_type": MT_MANIFEST,
        "layers": manifest["layers"],
        "config_digest": manifest["config"]["digest"],
        "expect_present": list(EXPECT_PRESENT),
        "expect_absent": list(EXPECT_ABSENT),
        "expect_files": {**EXPECT_FILES, "/sbin/init": init_script},
        "expect_symlinks": dict(EXPECT_SYMLINKS),
        "boot_marker": BOOT_MARKER,
    }


def push_layers(registry: str, repo: str, tag: str, layers: list[bytes], workdir: Path) -> dict:
    """Push an image made of the given (uncompressed) layer tars, as they are: no umoci,
    so a layer may hold what no tool would write (hostile whiteouts). Returns {"ref", "digest"}."""
    _check_registry(registry)
    layout = Path(workdir) / "layout"
    shutil.rmtree(layout, ignore_errors=True)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    blobs = _Layout(layout)
    entries, diff_ids = [], []
    for tar in layers:
        data, media_type = _compress(tar, "gzip")
        digest, size = blobs.write(data)
        entries.append({"mediaType": media_type, "digest": digest, "size": size})
        diff_ids.append(_sha256(tar))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/sbin/init"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cdigest, csize = blobs.write_json(config)
    mdigest, msize = blobs.write_json(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": csize},
            "layers": entries,
        }
    )
    blobs.set_index({"schemaVersion": 2, "manifests": []})
    blobs.retag(tag, MT_MANIFEST, mdigest, msize)
    pushed = _skopeo_push(layout, tag, f"{registry}/{repo}:{tag}", workdir=Path(workdir))
    if pushed != mdigest:
        raise OciFixtureError(f"skopeo pushed {pushed}, the layout has {mdigest}")
    return {"ref": f"{registry}/{repo}:{tag}", "digest": mdigest}


def push_multiarch_index(
    registry: str,
    repo: str = DEFAULT_REPO,
    tag: str = "multi",
    workdir: Path | None = None,
    *,
    compression: str = "gzip",
) -> dict:
    """Push an OCI image index with linux/amd64 (the test image) and linux/arm64.

    The arm64 entry is a dummy: the same layers (amd64 busybox!) under a config
    that says architecture arm64, so it has its own manifest digest.  Returns
    {"ref", "digest" (the index's), "media_type", "platforms": {"linux/amd64": digest,
    "linux/arm64": digest}, plus the amd64 image's expectations as in push_test_image}.
    """
    _check_registry(registry)
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="banger-oci-index-")) if workdir is None else Path(workdir)
    try:
        layout, amd64 = build_test_layout(work, tag, compression)
        blobs = _Layout(layout)
        manifest = blobs.read_json(amd64)
        config = {**blobs.read_json(manifest["config"]["digest"]), "architecture": "arm64", "variant": "v8"}
        cdigest, csize = blobs.write_json(config)
        arm64, arm64_size = blobs.write_json({**manifest, "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": csize}})
        entries = [
            {"mediaType": MT_MANIFEST, "digest": amd64, "size": blobs.path(amd64).stat().st_size,
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": MT_MANIFEST, "digest": arm64, "size": arm64_size,
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
        ]  # fmt: skip
        idigest, isize = blobs.write_json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries})
        blobs.retag(tag, MT_INDEX, idigest, isize)
        pushed = _skopeo_push(layout, tag, f"{registry}/{repo}:{tag}", all_images=True, workdir=work)
        if pushed != idigest:
            raise OciFixtureError(f"skopeo pushed {pushed}, the layout has {idigest}")
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "ref": f"{registry}/{repo}:{tag}",
        "digest": idigest,
        "media_type": MT_INDEX,
        "platforms": {"linux/amd64": amd64, "linux/arm64": arm64},
        "expect_present": list(EXPECT_PRESENT),
        "expect_absent": list(EXPECT_ABSENT),
        "expect_files": dict(EXPECT_FILES),
        "expect_symlinks": dict(EXPECT_SYMLINKS),
        "boot_marker": BOOT_MARKER,
    }


# ------------------------------------------------------------------------ fixtures

try:
    import pytest
except ImportError:  # usable as a plain module without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def oci_registry() -> Iterator[RegistryAddress]:
        """A docker-registry on 127.0.0.1 for the whole session: "127.0.0.1:PORT"."""
        missing = missing_tools()
        if missing:
            pytest.skip(f"not installed: {', '.join(missing)} (apt-get install -y docker-registry umoci skopeo)")
        with registry() as address:
            yield address

    @pytest.fixture(scope="session")
    def oci_token_registry() -> Iterator[RegistryAddress]:
        """A registry that wants a bearer token from an anonymous token endpoint."""
        missing = missing_tools()
        if missing:
            pytest.skip(f"not installed: {', '.join(missing)} (apt-get install -y docker-registry umoci skopeo)")
        with registry(token_auth=True) as address:
            yield address

    @pytest.fixture(scope="session")
    def oci_test_image(oci_registry: str, tmp_path_factory) -> dict:
        """The test image pushed as 127.0.0.1:PORT/banger/busybox:1 (gzip layers)."""
        return push_test_image(oci_registry, workdir=tmp_path_factory.mktemp("oci-image"))
