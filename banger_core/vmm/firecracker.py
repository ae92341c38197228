"""Firecracker driver: speaks Firecracker's HTTP API on its Unix socket directly.

Sequence (see the upstream API spec, vendored in tests/vendor/firecracker/): PUT
/logger, /machine-config, /boot-source, /drives/{id}, /network-interfaces/{id}, /vsock,
then PUT /actions InstanceStart. Stop asks for SendCtrlAltDel.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import time
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


class FirecrackerDriver(Driver):
    name = "firecracker"

    def __init__(self, binary: str = "firecracker", api_timeout: float = 10.0) -> None:
        self.binary = binary
        self.api_timeout = api_timeout

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
        if shutil.which(self.binary) is None:
            raise BangerError(ErrorCode.OPERATION_FAILED, f"cannot boot with Firecracker: {self.binary} not found")
        self.boot_kernel(machine)  # refuse before starting anything
        run_dir.mkdir(parents=True, exist_ok=True)
        sock = VMFiles(run_dir).firecracker_socket
        for f in self.run_files(run_dir):
            f.unlink(missing_ok=True)
        console = Path(machine.console_log or VMFiles(run_dir).console_log)
        with open(console, "wb") as out:
            p = subprocess.Popen(
                [self.binary, "--api-sock", str(sock), "--id", process_tag(vm_id)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives this request and the daemon
                close_fds=True,
            )
        fsutil.atomic_write(VMFiles(run_dir).vmm_pid, f"{p.pid}\n")
        try:
            self._wait_socket(sock, p)
            self.configure(FirecrackerAPI(str(sock), self.api_timeout), machine, run_dir)
        except BaseException:
            p.kill()
            p.wait()
            raise
        return Launch(pid=p.pid, api_socket=str(sock))

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
    def configure(api: FirecrackerAPI, machine: Machine, run_dir: Path) -> None:
        """The whole pre-boot request sequence, then InstanceStart."""
        fc_log = VMFiles(run_dir).firecracker_log
        fc_log.touch()
        api.put_logger(str(fc_log))
        api.put_machine_config(machine.vcpus, machine.memory_mib)
        api.put_boot_source(FirecrackerDriver.boot_kernel(machine), " ".join(machine.boot_args), machine.initrd)
        for d in machine.drives:
            api.put_drive(d.id, d.path, d.root, d.read_only)
        for n in machine.nics:
            api.put_network_interface(n.id, n.tap, n.mac)
        if machine.agent is not None and machine.agent.kind == "vsock":
            api.put_vsock(machine.agent.guest_cid or 3, machine.agent.host_path)
        api.action("InstanceStart")

    def request_shutdown(self, pid: int, run_dir: Path) -> None:
        if alive(pid):
            FirecrackerAPI(str(VMFiles(run_dir).firecracker_socket), self.api_timeout).action("SendCtrlAltDel")

    def pause(self, pid: int, run_dir: Path) -> None:
        FirecrackerAPI(str(VMFiles(run_dir).firecracker_socket), self.api_timeout).patch_vm("Paused")

    def resume(self, pid: int, run_dir: Path) -> None:
        FirecrackerAPI(str(VMFiles(run_dir).firecracker_socket), self.api_timeout).patch_vm("Resumed")

    def run_files(self, run_dir: Path) -> list[Path]:
        return [VMFiles(run_dir).firecracker_socket, VMFiles(run_dir).vmm_pid]
