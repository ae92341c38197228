#!/usr/bin/env python3
"""A stand-in `firecracker` binary for tests: serves the API on --api-sock, checks every
request against firecracker.yaml and Firecracker's pre-boot rules, and records them.

It boots nothing (no Firecracker binary can run on this machine). InstanceStart flips
the state to Running; SendCtrlAltDel makes the process exit, as Firecracker does when
its guest shuts down.
"""

from __future__ import annotations

import argparse
import json
import os
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fcspec import validate_request

PRE_BOOT_ONLY = {
    "putGuestBootSource",
    "putMachineConfiguration",
    "putLogger",
    "putGuestVsock",
    "putGuestNetworkInterfaceByID",
    "putGuestDriveByID",
}


class State:
    started = False
    configured: set[str] = set()
    record: Path | None = None
    boot: dict[str, Any]  # the putGuestBootSource body; set in __main__
    lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a) -> None:  # quiet
        pass

    def _reply(self, code: int, body: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(code)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = json.loads(raw) if raw else None  # validated against the spec below
        try:
            op = validate_request(method, self.path, body)
        except Exception as exc:
            self._record(method, body, None, f"invalid: {exc}")
            return self._reply(400, {"fault_message": f"invalid request: {str(exc).splitlines()[0]}"})
        with State.lock:
            if op in PRE_BOOT_ONLY and State.started:
                self._record(method, body, op, "after start")
                return self._reply(400, {"fault_message": "The requested operation is not supported after starting the microVM."})
            if op == "putLogger" and not os.path.exists(body["log_path"]):
                return self._reply(400, {"fault_message": "log_path does not exist"})
            if op == "createSyncAction":
                action = body["action_type"]
                if action == "InstanceStart":
                    missing = {"putGuestBootSource"} - State.configured
                    if missing or State.started:
                        self._record(method, body, op, "bad start")
                        return self._reply(400, {"fault_message": "cannot start: boot source missing or already started"})
                    for path in ("kernel_image_path", "initrd_path"):
                        p = State.boot.get(path)
                        if p and not os.path.exists(p):
                            return self._reply(400, {"fault_message": f"{path} {p} does not exist"})
                    State.started = True
                    print("fake firecracker: guest 'booted'", flush=True)
                elif action == "SendCtrlAltDel":
                    if not State.started:
                        return self._reply(400, {"fault_message": "not started"})
                    threading.Timer(0.3, lambda: os._exit(0)).start()
            State.configured.add(op)
            if op == "putGuestBootSource":
                State.boot = body
        self._record(method, body, op, "ok")
        if op == "describeInstance":
            return self._reply(
                200,
                {
                    "id": ARGS.id,
                    "state": "Running" if State.started else "Not started",
                    "vmm_version": "1.17.0-dev",
                    "app_name": "Firecracker",
                },
            )
        self._reply(204)

    def _record(self, method, body, op, result) -> None:
        if State.record:
            with State.record.open("a") as fh:
                fh.write(json.dumps({"method": method, "path": self.path, "body": body, "op": op, "result": result}) + "\n")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_GET(self) -> None:
        self._handle("GET")


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--api-sock", required=True)
    ap.add_argument("--id", required=True)
    ARGS = ap.parse_args()
    State.boot = {}
    State.record = Path(os.environ["FC_FAKE_RECORD"]) if os.environ.get("FC_FAKE_RECORD") else None
    with Server(ARGS.api_sock, Handler) as srv:
        srv.serve_forever()
