"""banger's guest agent: runs commands for the host over one channel (protocol.py).

Standard library only; one thread around a selector. Started early in boot by the
launcher images carry (launch.sh), from the read-only agent disk banger attaches to
every VM, so a new agent never needs a new image.

Sessions run concurrently. ``exec`` runs an argv as given (no shell), with env, cwd and
user, in a process group of its own; stdin, stdout and stderr stream both ways as raw
bytes; the session ends with the exit status (128+N for signal N). When the host side
goes away (the port hangs up) or says HELLO again, every session's process group is
killed. ``health`` says who is answering; ``poweroff`` syncs, answers, then powers off.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Any

from banger_guest import __version__
from banger_guest import protocol as P

PORT_NAME = "banger.agent"
READ = 64 * 1024
#: how long a session waits for its output to end once its command exited (a background
#: child may hold the pipes open)
OUTPUT_GRACE = 2.0
#: what a bare process gets when the request names no PATH (a minimal init's env has none)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"banger-agent: {msg}", file=sys.stderr, flush=True)


def find_port() -> str | None:
    """The device of the virtio-serial port named banger.agent (udev's symlink if there
    is one, else the name the port advertises in sysfs)."""
    link = f"/dev/virtio-ports/{PORT_NAME}"
    if os.path.exists(link):
        return link
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        try:
            with open(name_file) as fh:
                if fh.read().strip() == PORT_NAME:
                    return "/dev/" + os.path.basename(os.path.dirname(name_file))
        except OSError:
            continue
    return None


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return default


def cmdline_value(key: str) -> str | None:
    for word in _read("/proc/cmdline").split():
        if word.startswith(key + "="):
            return word[len(key) + 1 :]
    return None


def set_identity() -> None:
    """hostname = the VM's name (banger.vm= on the kernel command line), and an
    /etc/hosts line for it so the name resolves in every network mode."""
    name = cmdline_value("banger.vm")
    if not name:
        return
    try:
        with open("/proc/sys/kernel/hostname", "w") as fh:
            fh.write(name)
    except OSError as exc:
        log(f"cannot set the hostname: {exc}")
    try:
        lines = _read("/etc/hosts").splitlines()
        want = f"127.0.1.1\t{name}"
        if want not in lines:
            kept = [ln for ln in lines if not ln.startswith("127.0.1.1")]
            with open("/etc/hosts.banger-tmp", "w") as fh:
                fh.write("\n".join([*kept, want]) + "\n")
            os.replace("/etc/hosts.banger-tmp", "/etc/hosts")
    except OSError as exc:
        log(f"cannot write /etc/hosts: {exc}")


def build_info() -> dict[str, Any]:
    try:
        with open(os.path.join(HERE, "..", "..", "build.json")) as fh:  # the agent disk's root
            info: dict[str, Any] = json.load(fh)
            return info
    except (OSError, ValueError):
        return {}


class Session:
    def __init__(self, sid: int, proc: subprocess.Popen[bytes]) -> None:
        self.sid = sid
        self.proc = proc
        self.pgid = proc.pid  # start_new_session: the child leads its own group
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.open_outputs = 2
        self.status: int | None = None
        self.exited_at = 0.0

    def kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except OSError:
            pass


class Agent:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sel = selectors.DefaultSelector()
        self.decoder = P.Decoder()
        self.out = bytearray()
        self.sessions: dict[int, Session] = {}
        self.fds: dict[int, tuple[Session, str]] = {}  # pipe fd -> (session, "stdin"|"stdout"|"stderr")
        self.connected = False  # until a read says a host is there (poll_reconnect)
        self.powering_off = False
        self.sigchld_r, sigchld_w = os.pipe()
        os.set_blocking(self.sigchld_r, False)
        os.set_blocking(sigchld_w, False)
        signal.set_wakeup_fd(sigchld_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(self.sigchld_r, selectors.EVENT_READ, "sigchld")

    # --- sending ----------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if not self.connected:
            return  # nobody to hear it: what a port gets while no host is connected is lost anyway
        self.out += data
        self._want_write(True)

    def send_json(self, kind: int, sid: int, obj: dict[str, Any]) -> None:
        self.send(P.encode_json(kind, sid, obj))

    def _want_write(self, on: bool) -> None:
        if self.connected:
            self.sel.modify(self.fd, selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0), "port")

    def flush(self) -> None:
        while self.out:
            try:
                n = os.write(self.fd, self.out[:READ])
            except BlockingIOError:
                return
            except OSError as exc:  # the host went away mid-write
                log(f"port write: {exc}")
                self.host_gone()
                return
            del self.out[:n]
        self._want_write(False)

    # --- the host coming and going ------------------------------------------------------
    def drop_sessions(self) -> None:
        for s in list(self.sessions.values()):
            s.kill()
            self.forget(s)

    def host_gone(self) -> None:
        """The port hung up: kill every session, then wait for a host to connect."""
        if self.connected:
            log("host disconnected: sessions ended")
        self.drop_sessions()
        self.connected = False
        self.out.clear()
        self.sel.unregister(self.fd)

    def poll_reconnect(self) -> None:
        """While no host is connected the port reads EOF (and polls as hung up): try a
        read now and then; EAGAIN or data means a host is back."""
        try:
            data = os.read(self.fd, READ)
        except BlockingIOError:
            data = None
        except OSError:
            return
        if data == b"":
            return
        self.connected = True
        self.decoder = P.Decoder()
        self.sel.register(self.fd, selectors.EVENT_READ, "port")
        if data:
            self.on_frames(self.decoder.feed(data))

    def on_port(self) -> None:
        try:
            data = os.read(self.fd, READ)
        except BlockingIOError:
            return
        except OSError as exc:
            log(f"port read: {exc}")
            self.host_gone()
            return
        if not data:
            self.host_gone()
            return
        self.on_frames(self.decoder.feed(data))

    # --- frames ----------------------------------------------------------------------
    def on_frames(self, frames: list[P.Frame]) -> None:
        for f in frames:
            try:
                self.on_frame(f)
            except P.ProtocolError as exc:
                if f.session:
                    self.send_json(P.ERROR, f.session, {"message": str(exc)})

    def on_frame(self, f: P.Frame) -> None:
        if f.kind == P.HELLO:
            hello = f.obj()
            self.drop_sessions()
            self.out.clear()
            self.send(P.SYNC)
            self.send_json(P.WELCOME, 0, {"nonce": hello.get("nonce"), **self.health()})
            return
        s = self.sessions.get(f.session)
        if f.kind == P.OPEN:
            if s is not None:
                self.send_json(P.ERROR, f.session, {"message": f"session {f.session} is already open"})
                return
            self.open(f.session, f.obj())
        elif s is None:
            return  # a session that ended meanwhile
        elif f.kind == P.STDIN:
            if not s.stdin_eof and s.proc.stdin is not None:
                s.stdin_buf += f.payload
                self._stdin_interest(s)
        elif f.kind == P.STDIN_EOF:
            s.stdin_eof = True
            self._stdin_interest(s)
        elif f.kind == P.SIGNAL:
            sig = f.obj().get("signal")
            if isinstance(sig, int) and 0 < sig < 65:
                try:
                    os.killpg(s.pgid, sig)
                except OSError:
                    pass
        elif f.kind == P.CLOSE:
            s.kill()
            self.forget(s)

    def health(self) -> dict[str, Any]:
        try:
            uptime = float(_read("/proc/uptime", "0").split()[0])
        except (ValueError, IndexError):
            uptime = 0.0
        return {
            "agent": __version__,
            "version": P.VERSION,
            "build": build_info(),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "uptime": uptime,
            "hostname": _read("/proc/sys/kernel/hostname"),
            "python": sys.version.split()[0],
        }

    def open(self, sid: int, req: dict[str, Any]) -> None:
        op = req.get("op")
        if op == "health":
            self.send_json(P.RESULT, sid, self.health())
        elif op == "poweroff":
            os.sync()
            self.send_json(P.RESULT, sid, {"synced": True})
            self.powering_off = True
        elif op == "exec":
            self.exec(sid, req)
        else:
            self.send_json(P.ERROR, sid, {"message": f"unknown op {op!r}"})

    def exec(self, sid: int, req: dict[str, Any]) -> None:
        argv = req.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            self.send_json(P.ERROR, sid, {"message": "exec needs a non-empty argv of strings", "status": 2})
            return
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "dumb", "LANG": "C.UTF-8"}
        env.update({k: v for k, v in (req.get("env") or {}).items() if isinstance(k, str) and isinstance(v, str)})
        cwd = req.get("cwd") or None
        user = req.get("user") or None
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                user=user,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            status = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
            where = f" (in {cwd})" if cwd and exc.filename == cwd else ""
            self.send_json(P.ERROR, sid, {"message": f"{exc.filename or argv[0]}: {exc.strerror}{where}", "status": status})
            return
        except (KeyError, ValueError) as exc:  # an unknown user
            self.send_json(P.ERROR, sid, {"message": f"cannot run as {user!r}: {exc}", "status": 126})
            return
        s = Session(sid, proc)
        self.sessions[sid] = s
        assert proc.stdin and proc.stdout and proc.stderr
        for pipe, what in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
            os.set_blocking(pipe.fileno(), False)
            self.fds[pipe.fileno()] = (s, what)
            self.sel.register(pipe.fileno(), selectors.EVENT_READ, what)
        os.set_blocking(proc.stdin.fileno(), False)
        self.fds[proc.stdin.fileno()] = (s, "stdin")
        if not req.get("stdin", True):
            s.stdin_eof = True
            self._stdin_interest(s)

    def _stdin_interest(self, s: Session) -> None:
        pipe = s.proc.stdin
        if pipe is None or pipe.closed:
            return
        fd = pipe.fileno()
        registered = fd in self.sel.get_map()
        if s.stdin_buf and not registered:
            self.sel.register(fd, selectors.EVENT_WRITE, "stdin")
        elif not s.stdin_buf:
            if registered:
                self.sel.unregister(fd)
            if s.stdin_eof:
                self._close_stdin(s)

    def _close_stdin(self, s: Session) -> None:
        pipe = s.proc.stdin
        if pipe is not None and not pipe.closed:
            fd = pipe.fileno()
            if fd in self.sel.get_map():
                self.sel.unregister(fd)
            self.fds.pop(fd, None)
            try:
                pipe.close()
            except OSError:
                pass

    def on_stdin(self, fd: int) -> None:
        s, _ = self.fds[fd]
        try:
            n = os.write(fd, s.stdin_buf[:READ])
            del s.stdin_buf[:n]
        except BlockingIOError:
            return
        except OSError:  # the command closed its stdin: what is left goes nowhere
            s.stdin_buf.clear()
            s.stdin_eof = True
        self._stdin_interest(s)

    def on_output(self, fd: int) -> None:
        s, what = self.fds[fd]
        try:
            data = os.read(fd, READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            for frame in P.encode_data(P.STDOUT if what == "stdout" else P.STDERR, s.sid, data):
                self.send(frame)
            return
        self.sel.unregister(fd)
        self.fds.pop(fd, None)
        os.close(fd)
        s.open_outputs -= 1
        self.maybe_done(s)

    def reap(self) -> None:
        try:
            while os.read(self.sigchld_r, 4096):
                pass
        except BlockingIOError:
            pass
        for s in list(self.sessions.values()):
            if s.status is None:
                rc = s.proc.poll()
                if rc is not None:
                    s.status = 128 - rc if rc < 0 else rc
                    s.exited_at = time.monotonic()
                    self.maybe_done(s)
            elif s.open_outputs and time.monotonic() - s.exited_at > OUTPUT_GRACE:
                s.open_outputs = 0  # a background child holds the pipes: stop waiting for them
                self.maybe_done(s)

    def maybe_done(self, s: Session) -> None:
        if s.status is None or s.open_outputs > 0:
            return
        self.send_json(P.EXIT, s.sid, {"status": s.status})
        self.forget(s)

    def _timeout(self) -> float | None:
        if not self.connected:
            return 0.2
        return 0.5 if any(s.status is not None for s in self.sessions.values()) else None

    def forget(self, s: Session) -> None:
        """Drop a session: its pipes closed, its child reaped when it exits."""
        self.sessions.pop(s.sid, None)
        for fd, (owner, _what) in list(self.fds.items()):
            if owner is s:
                if fd in self.sel.get_map():
                    self.sel.unregister(fd)
                del self.fds[fd]
                try:
                    os.close(fd)
                except OSError:
                    pass
        for pipe in (s.proc.stdin, s.proc.stdout, s.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        s.proc.poll()

    # --- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        while True:
            for key, mask in self.sel.select(timeout=self._timeout()):
                what = key.data
                if what == "port":
                    if mask & selectors.EVENT_READ:
                        self.on_port()
                    if self.connected and mask & selectors.EVENT_WRITE:
                        self.flush()
                elif what == "sigchld":
                    self.reap()
                elif what == "stdin":
                    self.on_stdin(key.fd)
                else:
                    self.on_output(key.fd)
            if not self.connected:
                self.poll_reconnect()
            if self.powering_off and not self.out:
                self.poweroff()
            self.reap()

    def poweroff(self) -> None:
        self.powering_off = False
        for cmd in (["systemctl", "poweroff"], ["poweroff"], ["busybox", "poweroff"]):
            try:
                subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL)
                return
            except OSError:
                continue


def main() -> int:
    inherited = os.environ.get("BANGER_AGENT_FD")  # a channel handed over (tests): no port, no identity
    if inherited:
        fd = int(inherited)
        os.set_blocking(fd, False)
        Agent(fd).run()
        return 0
    set_identity()
    deadline = time.monotonic() + 60
    path = find_port()
    while path is None and time.monotonic() < deadline:  # the port's driver may still be loading
        time.sleep(0.1)
        path = find_port()
    if path is None:
        log(f"no virtio-serial port named {PORT_NAME}: nothing to serve")
        return 1
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    log(f"serving on {path} (agent {__version__}, protocol {P.VERSION})")
    Agent(fd).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
