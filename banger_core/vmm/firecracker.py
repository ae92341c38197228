"""Firecracker driver: speaks Firecracker's HTTP API on its Unix socket directly.

Sequence (see the upstream API spec, vendored in tests/vendor/firecracker/): PUT
/logger, /machine-config, /boot-source, /drives/{id}, /network-interfaces/{id}, /vsock,
then PUT /actions InstanceStart. Stop asks for SendCtrlAltDel.

Snapshots: PUT /snapshot/create on the paused guest writes its device state (``vmstate``)
and memory (``memory``); a fresh process continues it after PUT /logger and PUT
/snapshot/load. Firecracker reopens the drives and rebinds the vsock socket from the
paths the state file recorded, so those paths must be retargetable: every VM is given
paths under a *link*, ``<links_dir>/<link_id>/…``, where ``<links_dir>/<link_id>`` is a
symlink to a VM's directory, and ``drives/<drive_id>`` in that directory links to the
drive (the vsock socket lands in the directory itself, or in ``vsock-dir``, a link to
its directory when that is another). A cold boot's link id is the VM id; a restored VM
inherits its snapshot's. A launch or restore points the link at its own directory
(holding ``<links_dir>/<link_id>.lock``) while Firecracker opens what it is given; a
restore points it back afterwards: Firecracker holds what it opened and does not
resolve those paths again (except the vsock socket's for guest-initiated connections,
``<uds_path>_<port>``, which banger's guest never makes). The link layout a VMM was
given is recorded in its directory (``firecracker-link``) and copied into each snapshot
(``firecracker.json``). A TAP is a name, not a path: a restore names its own in
network_overrides.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from banger_core import fsutil
from banger_core.paths import VMFiles
from banger_core.errors import BangerError, ErrorCode
from banger_core.models import Machine
from banger_core.vmm.base import Driver, Launch, alive, kernel_is_elf, process_tag

log = logging.getLogger("banger.vmm.firecracker")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class FirecrackerAPI:
    """One method per request banger sends; each returns the parsed body (or None)."""

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Accept": "application/json"}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"Firecracker API {method} {path}: {exc}") from None
        finally:
            conn.close()
        parsed = json.loads(data) if data else None
        if resp.status >= 300:
            fault = parsed.get("fault_message") if isinstance(parsed, dict) else data.decode(errors="replace")
            raise BangerError(ErrorCode.OPERATION_FAILED, f"Firecracker API {method} {path}: {resp.status} {fault}")
        return parsed

    def put_logger(self, log_path: str, level: str = "Info") -> None:
        self.request("PUT", "/logger", {"log_path": log_path, "level": level, "show_level": True, "show_log_origin": False})

    def put_machine_config(self, vcpus: int, mem_mib: int) -> None:
        self.request("PUT", "/machine-config", {"vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": False})

    def put_boot_source(self, kernel: str, boot_args: str, initrd: str | None) -> None:
        body: dict[str, Any] = {"kernel_image_path": kernel, "boot_args": boot_args}
        if initrd:
            body["initrd_path"] = initrd
        self.request("PUT", "/boot-source", body)

    def put_drive(self, drive_id: str, path: str, root: bool, read_only: bool) -> None:
        self.request(
            "PUT",
            f"/drives/{drive_id}",
            {"drive_id": drive_id, "path_on_host": path, "is_root_device": root, "is_read_only": read_only},
        )

    def put_network_interface(self, iface_id: str, tap: str, mac: str) -> None:
        self.request("PUT", f"/network-interfaces/{iface_id}", {"iface_id": iface_id, "host_dev_name": tap, "guest_mac": mac})

    def put_vsock(self, guest_cid: int, uds_path: str) -> None:
        self.request("PUT", "/vsock", {"guest_cid": guest_cid, "uds_path": uds_path})

    def action(self, action_type: str) -> None:
        self.request("PUT", "/actions", {"action_type": action_type})

    def describe(self) -> Any:
        return self.request("GET", "/")

    def patch_vm(self, state: str) -> None:
        self.request("PATCH", "/vm", {"state": state})

    def create_snapshot(self, snapshot_path: str, mem_file_path: str) -> None:
        self.request(
            "PUT",
            "/snapshot/create",
            {"snapshot_type": "Full", "snapshot_path": snapshot_path, "mem_file_path": mem_file_path},
        )

    def load_snapshot(self, snapshot_path: str, mem_file_path: str, taps: dict[str, str]) -> None:
        """Load and resume; ``taps`` (interface id -> TAP) replaces the TAPs the state
        names (network_overrides, sent only when there are NICs)."""
        body: dict[str, Any] = {
            "snapshot_path": snapshot_path,
            "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
            "resume_vm": True,
        }
        if taps:
            body["network_overrides"] = [{"iface_id": i, "host_dev_name": t} for i, t in taps.items()]
        self.request("PUT", "/snapshot/load", body)


# In a VM's directory: the layout of the paths its VMM was given (see the module doc).
LINK_FILE = "firecracker-link"
DRIVES_DIR = "drives"  # drives/<drive_id> -> the drive
VSOCK_DIR = "vsock-dir"  # -> the vsock socket's directory, when that is not the VM's own
# In a snapshot's directory.
SNAPSHOT_STATE = "vmstate"
SNAPSHOT_MEMORY = "memory"
SNAPSHOT_META = "firecracker.json"
SUN_PATH_MAX = 107  # a unix socket path's bytes (sockaddr_un.sun_path is 108 with its NUL)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _name(value: str, what: str) -> str:
    """``value`` as one path component (a link id, a drive id)."""
    if not _NAME.fullmatch(value):
        raise BangerError(ErrorCode.BAD_REQUEST, f"{what} {value!r} cannot name a file (letters, digits, _ . - only)")
    return value


def _check_socket_path(path: str | Path, what: str) -> None:
    n = len(os.fsencode(path))
    if n > SUN_PATH_MAX:
        raise BangerError(
            ErrorCode.OPERATION_FAILED,
            f"{what} {path} is {n} bytes, longer than a unix socket path can be ({SUN_PATH_MAX}): "
            "use a shorter runtime or state directory (BANGER_RUNTIME_DIR, BANGER_STATE_DIR)",
        )


def _point(link: Path, target: str | None) -> None:
    """Make ``link`` a symlink to ``target`` in one step (a symlink under a temp name,
    renamed over it), or remove it (None)."""
    if target is None:
        link.unlink(missing_ok=True)
        return
    tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _target(link: Path) -> str | None:
    """Where ``link`` points (None if there is no link); refuses anything else there."""
    try:
        return os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError:
        raise BangerError(ErrorCode.OPERATION_FAILED, f"{link} is not a symlink: remove it") from None


def vsock_rel(machine: Machine, run_dir: Path) -> str | None:
    """Where the vsock socket lies relative to the link: its path in the VM's
    directory, else ``vsock-dir/<name>`` (``vsock-dir`` linking to its directory)."""
    if machine.agent is None or machine.agent.kind != "vsock":
        return None
    host = os.path.abspath(machine.agent.host_path)
    rel = os.path.relpath(host, os.path.abspath(run_dir))
    if rel.startswith(".."):
        return f"{VSOCK_DIR}/{os.path.basename(host)}"
    return rel


class FirecrackerDriver(Driver):
    """``links_dir``: where the per-VM links live (see the module doc; short: it is part
    of the vsock socket's path). Without one, Firecracker is given the real paths and
    the VM's snapshots cannot be restored."""

    name = "firecracker"

    def __init__(self, binary: str = "firecracker", api_timeout: float = 10.0, links_dir: Path | None = None) -> None:
        self.binary = binary
        self.api_timeout = api_timeout
        self.links_dir = links_dir

    def available(self) -> tuple[bool, str]:
        path = shutil.which(self.binary)
        if path is None:
            return False, f"{self.binary} not found on PATH"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return False, "/dev/kvm is not usable (Firecracker needs KVM)"
        return True, path

    @staticmethod
    def boot_kernel(machine: Machine) -> str:
        """Firecracker boots an uncompressed ELF vmlinux only (no bzImage on x86)."""
        for candidate in (machine.vmlinux, machine.kernel):
            if candidate and kernel_is_elf(candidate):
                return candidate
        raise BangerError(
            ErrorCode.BAD_REQUEST,
            f"Firecracker boots only an ELF vmlinux and kernel {machine.kernel} is not one: "
            "pull the microvm kernel (`banger kernel pull microvm-6.1`) or import a directory holding a vmlinux",
        )

    def launch(self, vm_id: str, machine: Machine, run_dir: Path) -> Launch:
        self.check_machine(machine)  # no user-mode networking: refused before anything starts
        if shutil.which(self.binary) is None:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"cannot boot with Firecracker: {self.binary} not found")
        self.boot_kernel(machine)  # refuse before starting anything
        run_dir.mkdir(parents=True, exist_ok=True)
        sock = VMFiles(run_dir).firecracker_socket
        for f in self.run_files(run_dir):
            f.unlink(missing_ok=True)
        if self.links_dir is None:
            link = None
            (run_dir / LINK_FILE).unlink(missing_ok=True)
        else:
            link = self.links_dir / _name(vm_id, "VM id")
            self._sweep()
            self._make_links(machine, run_dir, link)
        with self._locked(vm_id) if link is not None else nullcontext():
            if link is not None:  # while the lock is held, nobody else's restore needs it
                _point(link, os.path.abspath(run_dir))
                self._write_layout(run_dir, vm_id, machine)
            p = self._spawn(vm_id, machine, run_dir)
            try:
                self._wait_socket(sock, p)
                self.configure(FirecrackerAPI(str(sock), self.api_timeout), machine, run_dir, link)
            except BaseException:
                p.kill()
                p.wait()
                raise
        return Launch(pid=p.pid, api_socket=str(sock))

    def _spawn(self, vm_id: str, machine: Machine, run_dir: Path) -> subprocess.Popen[bytes]:
        """A fresh firecracker for ``vm_id`` (its API socket, pid file and console in
        ``run_dir``), detached so it outlives this request and the daemon."""
        sock = VMFiles(run_dir).firecracker_socket
        _check_socket_path(sock, "the Firecracker API socket")
        console = Path(machine.console_log or VMFiles(run_dir).console_log)
        with open(console, "wb") as out:
            p = subprocess.Popen(
                [self.binary, "--api-sock", str(sock), "--id", process_tag(vm_id)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives this request and the daemon
                close_fds=True,  # not the link lock either
            )
        fsutil.atomic_write(VMFiles(run_dir).vmm_pid, f"{p.pid}\n")
        return p

    def _wait_socket(self, sock: Path, p: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.api_timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise BangerError(
                    ErrorCode.OPERATION_FAILED, f"firecracker exited with status {p.returncode} before its API came up"
                )
            if sock.exists():
                try:
                    FirecrackerAPI(str(sock), 2).describe()
                    return
                except BangerError:
                    pass
            time.sleep(0.02)
        raise BangerError(ErrorCode.OPERATION_FAILED, f"firecracker API did not come up on {sock}")

    @staticmethod
    def configure(api: FirecrackerAPI, machine: Machine, run_dir: Path, link: Path | None = None) -> None:
        """The whole pre-boot request sequence, then InstanceStart. With ``link``, the
        drives and the vsock socket are named through it (see the module doc)."""
        fc_log = VMFiles(run_dir).firecracker_log
        fc_log.touch()
        api.put_logger(str(fc_log))
        api.put_machine_config(machine.vcpus, machine.memory_mib)
        api.put_boot_source(FirecrackerDriver.boot_kernel(machine), " ".join(machine.boot_args), machine.initrd)
        for d in machine.drives:
            api.put_drive(d.id, str(link / DRIVES_DIR / d.id) if link else d.path, d.root, d.read_only)
        for n in machine.nics:
            api.put_network_interface(n.id, str(n.tap), n.mac)
        if machine.agent is not None and machine.agent.kind == "vsock":
            rel = vsock_rel(machine, run_dir)
            api.put_vsock(machine.agent.guest_cid or 3, str(link / rel) if link and rel else machine.agent.host_path)
        api.action("InstanceStart")

    # --- the links (module doc) ----------------------------------------------------
    def _lock(self, link_id: str, wait: bool = True) -> int | None:
        """An fd holding ``<links_dir>/<link_id>.lock`` exclusively (None: it is held and
        ``wait`` is False). Whoever repoints the link, and has Firecracker open what it
        names, does so alone. A lock file is removed only by its holder (``_sweep``), so
        one locked after it was removed is not the lock: take the new one."""
        assert self.links_dir is not None
        self.links_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.links_dir / f"{link_id}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    @contextmanager
    def _locked(self, link_id: str) -> Iterator[None]:
        fd = self._lock(link_id)
        assert fd is not None  # waited for
        try:
            yield
        finally:
            os.close(fd)  # releases the lock

    def _sweep(self) -> None:
        """Remove the links whose directory is gone (a VM deleted with its VMM killed
        leaves one) and the lock files of links that are gone, each under its lock taken
        without waiting: what is in use is left for the next sweep."""
        assert self.links_dir is not None
        try:
            names = os.listdir(self.links_dir)
        except FileNotFoundError:
            return
        for link_id in {n.removesuffix(".lock") for n in names if _NAME.fullmatch(n)}:
            fd = self._lock(link_id, wait=False)
            if fd is None:
                continue
            try:
                link = self.links_dir / link_id
                target = os.readlink(link) if link.is_symlink() else None
                if target is not None and not os.path.isdir(target):
                    link.unlink()
                    target = None
                if target is None and not link.exists():
                    (self.links_dir / f"{link_id}.lock").unlink()  # while held: see _lock
            except OSError as exc:
                log.warning("sweeping Firecracker link %s: %s", link_id, exc)
            finally:
                os.close(fd)

    @staticmethod
    def _make_links(machine: Machine, run_dir: Path, link: Path) -> None:
        """``run_dir/drives/<id>`` for each drive (and ``vsock-dir`` when the socket is
        elsewhere), replacing a previous boot's; the vsock path through ``link`` must fit
        a unix socket path."""
        drives = run_dir / DRIVES_DIR
        shutil.rmtree(drives, ignore_errors=True)  # links only: rmtree does not follow them
        drives.mkdir()
        for d in machine.drives:
            os.symlink(os.path.abspath(d.path), drives / _name(d.id, "drive id"))
        (run_dir / VSOCK_DIR).unlink(missing_ok=True)
        rel = vsock_rel(machine, run_dir)
        if rel is not None and machine.agent is not None:
            _check_socket_path(link / rel, "the vsock socket's path through its link")
            if rel.startswith(f"{VSOCK_DIR}/"):
                os.symlink(os.path.dirname(os.path.abspath(machine.agent.host_path)), run_dir / VSOCK_DIR)

    @staticmethod
    def _write_layout(run_dir: Path, link_id: str, machine: Machine) -> None:
        """Record the paths this VM's Firecracker is given: its link id, its drives and
        its vsock socket, relative to the link."""
        layout = {"link_id": link_id, "drives": sorted(d.id for d in machine.drives), "vsock": vsock_rel(machine, run_dir)}
        fsutil.atomic_write(run_dir / LINK_FILE, json.dumps(layout) + "\n")

    @staticmethod
    def _read_layout(path: Path) -> dict[str, Any] | None:
        try:
            layout = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"cannot read {path}: {exc}") from None
        if not isinstance(layout, dict) or not isinstance(layout.get("link_id"), str):
            raise BangerError(ErrorCode.OPERATION_FAILED, f"{path} names no link id")
        _name(layout["link_id"], f"the link id in {path}")
        return layout

    # --- running VMs -----------------------------------------------------------------
    def _api(self, run_dir: Path) -> FirecrackerAPI:
        return FirecrackerAPI(str(VMFiles(run_dir).firecracker_socket), self.api_timeout)

    def request_shutdown(self, pid: int, run_dir: Path) -> None:
        if alive(pid):
            self._api(run_dir).action("SendCtrlAltDel")

    def pause(self, pid: int, run_dir: Path) -> None:
        self._api(run_dir).patch_vm("Paused")

    def resume(self, pid: int, run_dir: Path) -> None:
        self._api(run_dir).patch_vm("Resumed")

    def is_paused(self, pid: int, run_dir: Path) -> bool:
        return alive(pid) and self._api(run_dir).describe().get("state") == "Paused"

    # --- snapshots -------------------------------------------------------------------
    def snapshot(self, pid: int, run_dir: Path, dest: Path) -> None:
        """PUT /snapshot/create (Full) into ``dest/vmstate`` and ``dest/memory``, and the
        VM's link layout into ``dest/firecracker.json``: what restore repoints."""
        layout = self._read_layout(run_dir / LINK_FILE)
        if layout is None:
            raise BangerError(
                ErrorCode.BAD_REQUEST,
                "this VM's Firecracker was given its disks' own paths (booted without a link directory): "
                "a snapshot of it could not be restored; restart the VM and snapshot it again",
            )
        self._api(run_dir).create_snapshot(str(dest / SNAPSHOT_STATE), str(dest / SNAPSHOT_MEMORY))
        fsutil.atomic_write(dest / SNAPSHOT_META, json.dumps(layout) + "\n")

    def restore(self, vm_id: str, machine: Machine, run_dir: Path, src: Path) -> Launch:
        """A fresh firecracker loads ``src`` while the snapshot's link points at
        ``run_dir`` (whose ``drives/`` link to this machine's drives), then the link
        points where it did before (removed if that directory is gone)."""
        self.check_machine(machine)
        if self.links_dir is None:
            raise BangerError(ErrorCode.BAD_REQUEST, "the Firecracker driver restores snapshots only with a link directory")
        if shutil.which(self.binary) is None:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"cannot restore with Firecracker: {self.binary} not found")
        layout = self._read_layout(src / SNAPSHOT_META)
        if layout is None:
            raise BangerError(ErrorCode.BAD_REQUEST, f"{src} holds no Firecracker snapshot ({SNAPSHOT_META} is missing)")
        link_id: str = layout["link_id"]
        drives, rel = sorted(d.id for d in machine.drives), vsock_rel(machine, run_dir)
        if drives != layout.get("drives") or rel != layout.get("vsock"):
            raise BangerError(
                ErrorCode.BAD_REQUEST,
                f"the snapshot in {src} has drives {layout.get('drives')} and vsock socket {layout.get('vsock')!r}; "
                f"this VM has drives {drives} and vsock socket {rel!r}",
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        sock = VMFiles(run_dir).firecracker_socket
        for f in self.run_files(run_dir):
            f.unlink(missing_ok=True)
        vsock = Path(machine.agent.host_path) if rel is not None and machine.agent is not None else None
        if vsock is not None:
            vsock.unlink(missing_ok=True)  # Firecracker cannot bind over an old socket
        link = self.links_dir / link_id
        self._sweep()
        self._make_links(machine, run_dir, link)
        with self._locked(link_id):
            before = _target(link)
            p: subprocess.Popen[bytes] | None = None
            try:
                _point(link, os.path.abspath(run_dir))
                p = self._spawn(vm_id, machine, run_dir)
                self._wait_socket(sock, p)
                api = FirecrackerAPI(str(sock), self.api_timeout)
                fc_log = VMFiles(run_dir).firecracker_log
                fc_log.touch()
                api.put_logger(str(fc_log))
                api.load_snapshot(str(src / SNAPSHOT_STATE), str(src / SNAPSHOT_MEMORY), {n.id: str(n.tap) for n in machine.nics})
            except BaseException as exc:
                if p is not None:
                    p.kill()
                    p.wait()
                    VMFiles(run_dir).vmm_pid.unlink(missing_ok=True)
                    sock.unlink(missing_ok=True)
                    if vsock is not None:
                        vsock.unlink(missing_ok=True)  # what the killed firecracker bound
                if isinstance(exc, Exception):
                    why = exc.message if isinstance(exc, BangerError) else f"{type(exc).__name__}: {exc}"
                    raise BangerError(ErrorCode.OPERATION_FAILED, f"restoring the Firecracker snapshot {src}: {why}") from exc
                raise
            finally:
                _point(link, before if before is not None and os.path.isdir(before) else None)
        self._write_layout(run_dir, link_id, machine)
        return Launch(pid=p.pid, api_socket=str(sock))

    def run_files(self, run_dir: Path) -> list[Path]:
        """The API socket, the pid file, and the VM's link if it is this VM's own (it
        points here): a restored VM's link id is its snapshot's, whose link is not its to
        remove."""
        files = [VMFiles(run_dir).firecracker_socket, VMFiles(run_dir).vmm_pid]
        if self.links_dir is not None:
            try:
                layout = self._read_layout(run_dir / LINK_FILE)
            except BangerError:
                layout = None
            if layout is not None:
                link = self.links_dir / layout["link_id"]
                try:
                    if os.readlink(link) == os.path.abspath(run_dir):
                        files.append(link)
                except OSError:
                    pass
        return files
