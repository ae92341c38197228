"""banger's guest agent: runs commands for the host over one channel (protocol.py).

Standard library only; one thread around a selector. Started early in boot by the
launcher images carry (launch.sh), from the read-only agent disk banger attaches to
every VM, so a new agent never needs a new image.

The channel is a virtio-serial port (QEMU), or an AF_VSOCK listener when the kernel
command line says ``banger.agent=vsock:PORT`` (Firecracker): one host connection at a
time, the next accepted when it ends.

Sessions run concurrently. ``exec`` runs an argv as given (no shell), with env, cwd and
user, in a process group of its own, on pipes or on a pseudo-terminal of its own
(``tty``: sized, resized, its controlling terminal); stdin, stdout and stderr stream
both ways as raw bytes; the session ends with the exit status (128+N for signal N).
``cp_out``/``cp_in`` (transfer.py) and ``ports`` (ports.py) run in a forked child
handled the same way. While 4 MiB of output wait for the host, commands' output is not
read (their pipes fill and they wait): a slow host never grows the agent. When the host
side goes away (the port hangs up, the connection closes) or says HELLO again, every
session's process group is killed. ``health`` says who is answering; ``poweroff``
syncs, answers, then powers off; ``resume`` (identity.py) gives a VM just restored from
a snapshot its own clock, RNG seed, hostname, machine-id and SSH host keys.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from banger_guest import __version__, identity, netconf, workdisk
from banger_guest import protocol as P

PORT_NAME = "banger.agent"
READ = 64 * 1024
#: stop reading commands' output while this much waits for the host; resume below LOW
OUT_HIGH, OUT_LOW = 4 << 20, 1 << 20
#: how long a session waits for its output to end once its command exited (a background
#: child may hold the pipes open)
OUTPUT_GRACE = 2.0
#: what a bare process gets when the request names no PATH (a minimal init's env has none)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HERE = os.path.dirname(os.path.abspath(__file__))
#: the work disk mount done at start (``workdisk.mount``), reported by ``health``
WORKDISK: dict[str, str] = {}


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
    """hostname = the VM's name (banger.vm= on the kernel command line), with its
    /etc/hosts line so the name resolves in every network mode (and /etc/hostname when
    the image has one): what ``resume`` does for a restored VM (identity.write_hostname)."""
    name = cmdline_value("banger.vm")
    if not name:
        return
    try:
        identity.write_hostname("/", name, identity.Effects())
    except OSError as exc:
        log(str(exc))


def build_info() -> dict[str, Any]:
    try:
        with open(os.path.join(HERE, "..", "..", "build.json")) as fh:  # the agent disk's root
            info: dict[str, Any] = json.load(fh)
            return info
    except (OSError, ValueError):
        return {}


def set_winsize(fd: int, rows: Any, cols: Any) -> None:
    import fcntl
    import struct
    import termios

    if isinstance(rows, int) and isinstance(cols, int) and 0 < rows < 65536 and 0 < cols < 65536:
        try:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except OSError:
            pass


def _take_terminal() -> None:
    """In the child, after setsid: make its stdin (the pty) its controlling terminal."""
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _close_all(fds: Any) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _stop_copy(_signum: int, _frame: Any) -> None:
    raise SystemExit("stopped by the host (SIGTERM): nothing copied")


def _run_op(op: str, req: dict[str, Any], fds: tuple[int, int, int]) -> None:
    """The child of ``fork_op``: its own session, the three fds as 0/1/2, the op, exit."""
    status = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if op == "cp_in":  # told to stop (its input is incomplete): what it staged is removed first
            signal.signal(signal.SIGTERM, _stop_copy)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 65536)
        status = _op(op, req)
    except BaseException as exc:  # the child reports everything, then exits
        try:
            os.write(2, f"banger-agent: {op}: {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(status)


def _op(op: str, req: dict[str, Any]) -> int:
    from banger_guest import ports, transfer

    if op == "ports":
        data = json.dumps(ports.listeners(probe=bool(req.get("probe", True)))).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(1, view) :]
        return 0
    if op == "watch_ports":

        def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(1, view) :]

        ports.watch(write, interval=min(max(float(req.get("interval") or 0.5), 0.1), 10.0))
        return 0
    if op == "tcp_connect":
        ports.connect_relay(str(req.get("host") or "127.0.0.1"), int(req["port"]))
        return 0
    if op == "cp_out":
        with os.fdopen(1, "wb", buffering=transfer.BUFSIZE, closefd=False) as out:
            transfer.tar_out(str(req["path"]), out)
        return 0
    directory, rename = transfer.place(str(req["dest"]), "in the VM")
    with os.fdopen(0, "rb", buffering=transfer.BUFSIZE, closefd=False) as src:
        transfer.tar_in(src, directory, rename, owner=(0, 0) if os.geteuid() == 0 else None)
        while src.read(transfer.BUFSIZE):  # the stream's zero padding: read it all
            pass
    return 0


class Session:
    """One running session: a child (a command, or a forked op) leading its own process
    group, the fd its stdin is written to, the fds its output is read from, and for a
    terminal session the pty's master (to resize it)."""

    def __init__(
        self,
        sid: int,
        pid: int,
        stdin_fd: int | None,
        outputs: dict[int, str],
        proc: subprocess.Popen[bytes] | None = None,
        pty_fd: int | None = None,
    ) -> None:
        self.sid = sid
        self.pid = self.pgid = pid  # start_new_session/setsid: the child leads its own group
        self.proc = proc  # kept so subprocess never reaps it behind our back
        self.stdin_fd = stdin_fd
        self.outputs = outputs
        self.pty_fd = pty_fd
        self.stdin_buf = bytearray()
        self.stdin_eof = stdin_fd is None
        self.stdin_done = 0  # bytes of stdin written to the command (or dropped)
        self.stdin_acked = 0  # ... as last told the host (STDIN_ACK)
        self.open_outputs = len(outputs)
        self.status: int | None = None
        self.exited_at = 0.0

    def poll(self) -> int | None:
        """The exit status once the child exited (128+N for signal N)."""
        if self.proc is not None:
            rc = self.proc.poll()
        else:
            try:
                pid, st = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return 255
            if pid == 0:
                return None
            rc = os.waitstatus_to_exitcode(st)
        return None if rc is None else 128 - rc if rc < 0 else rc

    def kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except OSError:
            pass


class Agent:
    def __init__(self, fd: int, once: bool = False) -> None:
        self.fd = fd
        self.once = once  # fd is one connection (a vsock stream): run() returns when it ends
        self.sel = selectors.DefaultSelector()
        self.decoder = P.Decoder()
        self.out = bytearray()
        self.sessions: dict[int, Session] = {}
        self.unreaped: list[Session] = []  # sessions dropped before their child exited
        self.paused_outputs: set[int] = set()  # output fds not read while the host is behind
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
            if self.paused_outputs and len(self.out) < OUT_LOW:
                self._resume_outputs()
        self._want_write(False)

    # --- the host coming and going ------------------------------------------------------
    def drop_sessions(self) -> None:
        for s in list(self.sessions.values()):
            s.kill()
            self.forget(s)
        self.paused_outputs = set()

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
            if not s.stdin_eof:
                s.stdin_buf += f.payload
                self._stdin_interest(s)
            else:  # nobody reads it any more: done, as far as the host's window goes
                s.stdin_done += len(f.payload)
                self._ack_stdin(s)
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
        elif f.kind == P.RESIZE:
            if s.pty_fd is not None:
                size = f.obj()
                set_winsize(s.pty_fd, size.get("rows"), size.get("cols"))
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
            "workdisk": dict(WORKDISK) or None,
        }

    def open(self, sid: int, req: dict[str, Any]) -> None:
        op = req.get("op")
        if op == "health":
            self.send_json(P.RESULT, sid, self.health())
        elif op == "poweroff":
            os.sync()
            self.send_json(P.RESULT, sid, {"synced": True})
            self.powering_off = True
        elif op == "resume":
            self.resume(sid, req)
        elif op == "net":
            self.net(sid, req)
        elif op == "ssh_setup":
            self.ssh_setup(sid, req)
        elif op == "exec":
            self.exec(sid, req)
        elif op in ("cp_out", "cp_in", "ports", "watch_ports", "tcp_connect"):
            self.fork_op(sid, op, req)
        else:
            self.send_json(P.ERROR, sid, {"message": f"unknown op {op!r}"})

    def resume(self, sid: int, req: dict[str, Any]) -> None:
        """In this process, at once: a few writes and syscalls, then one RESULT (or an
        ERROR naming the bad field, with nothing applied). ``identity`` is imported
        with the agent, not here: a VM restored from a template would compile it anew
        on every restore (the agent runs without bytecode files)."""
        root = identity.root_from_env()
        if root == "/" and cmdline_value("banger.vm") is None:  # an agent run on a host (a test): never its identity
            self.send_json(P.ERROR, sid, {"message": "resume: not in a banger VM (no banger.vm= on the kernel command line)"})
            return
        try:
            result = identity.apply(req, root)
        except identity.BadRequest as exc:
            self.send_json(P.ERROR, sid, {"message": str(exc), "field": exc.field})
            return
        except Exception as exc:  # a bug must not take the agent down: say it, go on
            log(f"resume: {type(exc).__name__}: {exc}")
            self.send_json(P.ERROR, sid, {"message": f"resume: {type(exc).__name__}: {exc}"})
            return
        self.send_json(P.RESULT, sid, result)

    def ssh_setup(self, sid: int, req: dict[str, Any]) -> None:
        """The VM's own SSH host key pair (sshd told to reload it) and the public keys
        root's authorized_keys must hold; one RESULT, or an ERROR naming the bad field."""
        try:
            result = identity.ssh_setup("/", req.get("host_keys"), req.get("authorized_keys"), req.get("revoke"))
        except identity.BadRequest as exc:
            self.send_json(P.ERROR, sid, {"message": str(exc)})
            return
        except OSError as exc:
            self.send_json(P.ERROR, sid, {"message": f"ssh_setup: {exc}"})
            return
        self.send_json(P.RESULT, sid, result)

    def net(self, sid: int, req: dict[str, Any]) -> None:
        """A restored VM's own MAC, address, gateway and resolver (netconf), at once."""
        if cmdline_value("banger.vm") is None:  # an agent run on a host (a test): never its network
            self.send_json(P.ERROR, sid, {"message": "net: not in a banger VM (no banger.vm= on the kernel command line)"})
            return
        try:
            result = netconf.handle(req)
        except netconf.BadRequest as exc:
            self.send_json(P.ERROR, sid, {"message": str(exc), "field": exc.field})
            return
        except Exception as exc:
            log(f"net: {type(exc).__name__}: {exc}")
            self.send_json(P.ERROR, sid, {"message": f"net: {type(exc).__name__}: {exc}"})
            return
        self.send_json(P.RESULT, sid, result)

    def exec(self, sid: int, req: dict[str, Any]) -> None:
        argv = req.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            self.send_json(P.ERROR, sid, {"message": "exec needs a non-empty argv of strings", "status": 2})
            return
        tty = req.get("tty") if isinstance(req.get("tty"), dict) else None
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "dumb", "LANG": "C.UTF-8"}
        if tty is not None:
            env["TERM"] = str(tty.get("term") or "xterm-256color")
        env.update({k: v for k, v in (req.get("env") or {}).items() if isinstance(k, str) and isinstance(v, str)})
        cwd = req.get("cwd") or None
        user = req.get("user") or None
        if tty is not None:
            master, slave = os.openpty()
            set_winsize(master, tty.get("rows"), tty.get("cols"))
            child = (slave, slave, slave)
            mine = [master]
        else:
            (in_r, in_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
            child = (in_r, out_w, err_w)
            mine = [in_w, out_r, err_r]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=child[0],
                stdout=child[1],
                stderr=child[2],
                env=env,
                cwd=cwd,
                user=user,
                start_new_session=True,
                close_fds=True,
                preexec_fn=_take_terminal if tty is not None else None,
            )
        except OSError as exc:
            status = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
            where = f" (in {cwd})" if cwd and exc.filename == cwd else ""
            self.send_json(P.ERROR, sid, {"message": f"{exc.filename or argv[0]}: {exc.strerror}{where}", "status": status})
            _close_all(mine)
            return
        except (KeyError, ValueError) as exc:  # an unknown user
            self.send_json(P.ERROR, sid, {"message": f"cannot run as {user!r}: {exc}", "status": 126})
            _close_all(mine)
            return
        finally:
            _close_all(set(child))
        if tty is not None:
            s = Session(sid, proc.pid, os.dup(master), {master: "stdout"}, proc=proc, pty_fd=master)
        else:
            s = Session(sid, proc.pid, mine[0], {mine[1]: "stdout", mine[2]: "stderr"}, proc=proc)
        self.start(s, stdin=bool(req.get("stdin", True)))

    def fork_op(self, sid: int, op: str, req: dict[str, Any]) -> None:
        """An op that runs banger_guest code (cp, ports) in a forked child of its own,
        with its streams and status handled as an exec's (the interpreter running this
        agent may not be runnable on its own: no new exec)."""
        from banger_guest import transfer

        try:
            if op == "cp_out":
                transfer.check_source(str(req.get("path") or ""), "in the VM")
            elif op == "cp_in":
                if req.get("parents") is True:
                    transfer.make_dirs(str(req.get("dest") or ""), "in the VM")
                transfer.place(str(req.get("dest") or ""), "in the VM")
        except transfer.TransferError as exc:
            self.send_json(P.ERROR, sid, {"message": str(exc), "status": 1})
            return
        if op == "tcp_connect":
            port = req.get("port")
            if not isinstance(port, int) or not 0 < port < 65536 or not isinstance(req.get("host", ""), str):
                self.send_json(P.ERROR, sid, {"message": f"tcp_connect: bad port {port!r}", "status": 1})
                return
        (in_r, in_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _run_op(op, req, (in_r, out_w, err_w))
        _close_all([in_r, out_w, err_w])
        self.start(Session(sid, pid, in_w, {out_r: "stdout", err_r: "stderr"}), stdin=op in ("cp_in", "tcp_connect"))

    def start(self, s: Session, stdin: bool) -> None:
        self.sessions[s.sid] = s
        for fd, what in s.outputs.items():
            os.set_blocking(fd, False)
            self.fds[fd] = (s, what)
            if not self.paused_outputs:
                self.sel.register(fd, selectors.EVENT_READ, what)
            else:
                self.paused_outputs.add(fd)
        if s.stdin_fd is not None:
            os.set_blocking(s.stdin_fd, False)
            self.fds[s.stdin_fd] = (s, "stdin")
        if not stdin:
            s.stdin_eof = True
            self._stdin_interest(s)

    def _stdin_interest(self, s: Session) -> None:
        fd = s.stdin_fd
        if fd is None:
            return
        registered = fd in self.sel.get_map()
        if s.stdin_buf and not registered:
            self.sel.register(fd, selectors.EVENT_WRITE, "stdin")
        elif not s.stdin_buf:
            if registered:
                self.sel.unregister(fd)
            if s.stdin_eof:
                self._close_stdin(s)

    def _close_stdin(self, s: Session) -> None:
        fd, s.stdin_fd = s.stdin_fd, None
        if fd is not None:
            if fd in self.sel.get_map():
                self.sel.unregister(fd)
            self.fds.pop(fd, None)
            _close_all([fd])

    def on_stdin(self, fd: int) -> None:
        s, _ = self.fds[fd]
        try:
            n = os.write(fd, s.stdin_buf[:READ])
            del s.stdin_buf[:n]
        except BlockingIOError:
            return
        except OSError:  # the command closed its stdin: what is left goes nowhere
            n = len(s.stdin_buf)
            s.stdin_buf.clear()
            s.stdin_eof = True
        s.stdin_done += n
        self._ack_stdin(s)
        self._stdin_interest(s)

    def _ack_stdin(self, s: Session) -> None:
        """Tell the host how much stdin is done: every quarter window, and whenever the
        buffer runs dry (so a sender waiting on the window goes on)."""
        if s.stdin_done - s.stdin_acked >= P.STDIN_WINDOW // 4 or (not s.stdin_buf and s.stdin_done > s.stdin_acked):
            s.stdin_acked = s.stdin_done
            self.send_json(P.STDIN_ACK, s.sid, {"written": s.stdin_done})

    # --- backpressure: stop reading commands' output while the host is behind -----------
    def _pause_outputs(self) -> None:
        for fd, (_s, what) in self.fds.items():
            if what != "stdin" and fd in self.sel.get_map():
                self.sel.unregister(fd)
                self.paused_outputs.add(fd)
        self.paused_outputs.add(-1)  # paused even with no output fd yet

    def _resume_outputs(self) -> None:
        paused, self.paused_outputs = self.paused_outputs, set()
        for fd in paused:
            if fd in self.fds:
                self.sel.register(fd, selectors.EVENT_READ, self.fds[fd][1])

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
            if len(self.out) > OUT_HIGH:
                self._pause_outputs()
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
        self.unreaped = [s for s in self.unreaped if s.poll() is None]
        for s in list(self.sessions.values()):
            if s.status is None:
                status = s.poll()
                if status is not None:
                    s.status = status
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
        return 0.5 if self.unreaped or any(s.status is not None for s in self.sessions.values()) else None

    def forget(self, s: Session) -> None:
        """Drop a session: its pipes closed, its child reaped when it exits."""
        self.sessions.pop(s.sid, None)
        for fd, (owner, _what) in list(self.fds.items()):
            if owner is s:
                if fd in self.sel.get_map():
                    self.sel.unregister(fd)
                del self.fds[fd]
                self.paused_outputs.discard(fd)
                _close_all([fd])
        s.stdin_fd = None
        if s.status is None and s.poll() is None:  # killed a moment ago: reaped by reap() once it exits
            self.unreaped.append(s)

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
                if self.once:
                    return
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


def listen_address(spec: str) -> tuple[int, Any]:
    """The family and address a ``banger.agent=`` value names: ``vsock:PORT`` (any CID;
    Firecracker forwards the host's ``CONNECT PORT`` here) or ``unix:PATH`` (tests: the
    same listener over AF_UNIX)."""
    kind, _, where = spec.partition(":")
    if kind == "vsock" and where.isdigit():
        return socket.AF_VSOCK, (socket.VMADDR_CID_ANY, int(where))
    if kind == "unix" and where:
        return socket.AF_UNIX, where
    raise ValueError(f"not vsock:PORT or unix:PATH: {spec!r}")


def listen(family: int, address: Any, deadline: float) -> socket.socket:
    """A socket listening on ``address``, tried again until ``deadline`` (the vsock
    driver may still be loading)."""
    while True:
        sock = None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)  # not inherited by commands
            sock.bind(address)
            sock.listen(4)
            return sock
        except OSError:
            if sock is not None:
                sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def serve(lsock: socket.socket) -> None:
    """One host connection at a time, served by the Agent loop until it ends (its
    sessions are dropped, as when a port hangs up); then the next one."""
    agent = Agent(-1, once=True)
    while True:
        conn, _ = lsock.accept()
        with conn:
            conn.setblocking(False)
            agent.fd = conn.fileno()
            agent.poll_reconnect()  # registers the connection (unless it already ended)
            agent.run()
        if agent.powering_off:
            agent.poweroff()


#: the exit status meaning "this python cannot run the agent": the run script then
#: falls back to the python the agent disk carries
EX_PYTHON = 75


def require_modules() -> int | None:
    """With BANGER_AGENT_REQUIRE=FILE (the run script, trying the image's own python3):
    check that the import system finds every module FILE names, so a python lacking one
    (Debian's python3-minimal has no json, pty or tarfile) fails now, with EX_PYTHON,
    rather than in the middle of a session. Found, not imported: importing them all
    would cost the boot a second under TCG. One interpreter start probes and serves."""
    listed = os.environ.pop("BANGER_AGENT_REQUIRE", "")
    if not listed:
        return None
    import importlib.util

    with open(listed) as fh:
        names = [n.strip() for n in fh.read().replace(",", " ").split() if n.strip()]
    for name in names:
        try:
            found = name in sys.modules or importlib.util.find_spec(name) is not None
        except (ImportError, ValueError) as exc:
            found, why = False, f"{type(exc).__name__}: {exc}"
        else:
            why = "not found"
        if not found:
            log(f"{sys.executable} cannot import {name} ({why})")
            return EX_PYTHON
    log(f"running on the image's {sys.executable} (python {sys.version.split()[0]})")
    return None


def main() -> int:
    failed = require_modules()
    if failed is not None:
        return failed
    inherited = os.environ.get("BANGER_AGENT_FD")  # a channel handed over (tests): no port, no identity
    if inherited:
        fd = int(inherited)
        os.set_blocking(fd, False)
        Agent(fd).run()
        return 0
    listen_on = os.environ.get("BANGER_AGENT_LISTEN")  # unix:PATH (tests): the vsock listener, no identity
    if listen_on:
        serve(listen(*listen_address(listen_on), deadline=time.monotonic()))
        return 0
    set_identity()
    label = cmdline_value("banger.workdisk")
    if label:  # before serving: nothing the host places under /root may land beneath it
        WORKDISK.update(workdisk.mount(label))
        log(f"work disk: {WORKDISK}")
    net = cmdline_value("banger.net")
    if net:
        netconf.apply_at_boot(net, log)
    deadline = time.monotonic() + 60
    spec = cmdline_value("banger.agent")  # vsock:PORT on Firecracker; absent on QEMU (virtio-serial)
    if spec:
        try:
            lsock = listen(*listen_address(spec), deadline=deadline)
        except (ValueError, OSError) as exc:
            log(f"cannot listen on {spec}: {exc}: nothing to serve")
            return 1
        log(f"serving on {spec} (agent {__version__}, protocol {P.VERSION})")
        serve(lsock)
        return 0
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
