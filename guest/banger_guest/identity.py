"""The agent's ``resume`` op: a VM restored from a memory snapshot gets an identity of
its own. Standard library only.

A restored guest goes on exactly where the snapshot's source was: its hostname, its
/etc/machine-id, its SSH host keys, its kernel RNG state (two VMs restored from one
snapshot would read the same bytes from /dev/urandom) and its clock, stopped at the
snapshot. Right after the restore the host sends::

    {"op": "resume",
     "time_ns": int,             # the host's CLOCK_REALTIME (ns): the guest's clock is stepped to it
     "seed": "<hex>",            # 32..512 random bytes: mixed into the kernel RNG, credited, CRNG reseeded
     "hostname": str | null,     # the VM's name (a DNS label, as banger names VMs)
     "machine_id": str | null,   # 32 lowercase hex digits, not all zeros
     "ssh_host_keys": {"ed25519": {"private": str, "public": str}} | null}

``time_ns`` and ``seed`` are required, the others may be null or absent (not changed);
any other field is refused. The request is checked as a whole first: a bad field is a
``BadRequest`` naming it, and nothing is applied. Then each part is applied on its own
(an OSError in one goes to ``errors`` and the others still run) and the answer is::

    {"applied": ["clock", "rng", "hostname", "machine_id", "ssh_host_keys"],  # those done, in this order
     "skipped": {"ssh_host_keys": "no sshd in this image"},                    # asked for, not done, and why
     "errors": {"machine_id": "..."},                                          # asked for, failed
     "notes": {"rng": "...", "ssh_host_keys": "..."}}                          # how a done part went, when worth saying

Every file is taken under a ``root`` (``/`` in a VM). What is not a file under it is an
``Effects``: the clock, the RNG, the kernel's hostname, the SIGHUP to sshd. With the
root ``/`` the real ones are the default; with any other root the default is
``recording_effects(root)``, which only appends what it was asked to do to
``root/RECORD``, so no test can change the machine it runs on by leaving one out.

Test-only: ``BANGER_AGENT_IDENTITY_ROOT=DIR`` in the agent's environment makes the
agent's ``resume`` apply under DIR (so with recording effects). Never set in a VM.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

#: test-only: the root the agent's ``resume`` works under (see the module docstring)
ROOT_ENV = "BANGER_AGENT_IDENTITY_ROOT"
#: under a root other than /, where recording_effects writes what it was asked (JSON lines)
RECORD = "banger-identity-calls.jsonl"

#: the VM-name rule (banger_core.models.VM_NAME_RE, the same text): a DNS label
HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MACHINE_ID_RE = re.compile(r"[0-9a-f]{32}")
SEED_RE = re.compile(r"(?:[0-9a-fA-F]{2}){32,512}")  # 32..512 bytes (8 + 512 fits ioctl's 1 KiB buffer)
PUBLIC_KEY_RE = re.compile(r"ssh-ed25519 [A-Za-z0-9+/]+=*(?: [^\n\r\0]*)?\n?")
PRIVATE_KEY_RE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----\n[^\0]*-----END [A-Z ]*PRIVATE KEY-----\n?")
FIELDS = ("op", "time_ns", "seed", "hostname", "machine_id", "ssh_host_keys")
PARTS = ("clock", "rng", "hostname", "machine_id", "ssh_host_keys")

# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


class BadRequest(ValueError):
    """A field of a ``resume`` request that is not acceptable (``field`` names it)."""

    def __init__(self, field: str, why: str, op: str = "resume") -> None:
        super().__init__(f"{op}: bad {field}: {why}")
        self.field = field


@dataclass(frozen=True)
class Request:
    """A checked ``resume`` request."""

    time_ns: int
    seed: bytes
    hostname: str | None = None
    machine_id: str | None = None
    ssh_host_keys: dict[str, dict[str, str]] | None = None


def parse(req: dict[str, Any]) -> Request:
    """The request checked as a whole; BadRequest names the first bad field."""
    unknown = sorted(k for k in req if k not in FIELDS)
    if unknown:
        raise BadRequest(unknown[0], f"unknown field (a resume request has {', '.join(FIELDS[1:])})")
    t = req.get("time_ns")
    if isinstance(t, bool) or not isinstance(t, int) or not 0 < t < 2**63:
        raise BadRequest("time_ns", "expected a positive integer (ns since the epoch)")
    seed = req.get("seed")
    if not isinstance(seed, str) or not SEED_RE.fullmatch(seed):
        raise BadRequest("seed", "expected 32 to 512 bytes as hex digits")
    name = req.get("hostname")
    if name is not None and (not isinstance(name, str) or not HOSTNAME_RE.fullmatch(name)):
        raise BadRequest(
            "hostname", f"{_short(name)} is not a VM name (1-63 of a-z, 0-9 and '-', not starting or ending with '-')"
        )
    mid = req.get("machine_id")
    if mid is not None and (not isinstance(mid, str) or not MACHINE_ID_RE.fullmatch(mid) or mid == "0" * 32):
        raise BadRequest("machine_id", f"{_short(mid)} is not 32 lowercase hex digits (not all zeros)")
    keys = req.get("ssh_host_keys")
    if keys is not None:
        keys = _check_keys(keys)
    return Request(t, bytes.fromhex(seed), name, mid, keys)


#: an authorized_keys line banger adds: a key type, its base64, an optional comment
PUBLIC_ANY_RE = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}( [^\n\r]{0,200})?")


def _check_keys(keys: Any) -> dict[str, dict[str, str]]:
    if not isinstance(keys, dict) or set(keys) != {"ed25519"}:
        raise BadRequest("ssh_host_keys", 'expected {"ed25519": {"private": ..., "public": ...}}')
    pair = keys["ed25519"]
    if not isinstance(pair, dict) or set(pair) != {"private", "public"}:
        raise BadRequest("ssh_host_keys", 'expected {"ed25519": {"private": ..., "public": ...}}')
    private, public = pair["private"], pair["public"]
    if not isinstance(private, str) or not PRIVATE_KEY_RE.fullmatch(private):
        raise BadRequest("ssh_host_keys", "the ed25519 private key is not a PEM-armoured private key")  # never echoed
    if not isinstance(public, str) or not PUBLIC_KEY_RE.fullmatch(public):
        raise BadRequest("ssh_host_keys", "the ed25519 public key is not one line 'ssh-ed25519 BASE64 [comment]'")
    return {"ed25519": {"private": private, "public": public}}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- the effects: what is not a file under the root -----------------------------------
def set_clock(time_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)


def feed_rng(seed: bytes, device: str = "/dev/urandom") -> str | None:
    """Mix ``seed`` into the kernel's pool crediting all its bits, then reseed the CRNG
    from it. Without the right to credit (EPERM) the seed is written uncredited; the
    answer is then a note saying so (None when all went as asked)."""
    import fcntl
    import struct

    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", 8 * len(seed), len(seed)) + seed)
        except OSError as exc:
            if exc.errno != errno.EPERM:
                raise
            view = memoryview(seed)
            while view:
                view = view[os.write(fd, view) :]
            return "seed mixed in uncredited (RNDADDENTROPY refused: EPERM); the CRNG was not reseeded"
        try:
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                raise
            return "seed credited; this kernel has no RNDRESEEDCRNG (the CRNG takes it at its next reseed)"
        return None
    finally:
        os.close(fd)


def set_kernel_hostname(name: str) -> None:
    """The kernel's hostname (set_identity at boot, resume after a restore)."""
    with open("/proc/sys/kernel/hostname", "w") as fh:
        fh.write(name)


def hup(pid: int) -> None:
    os.kill(pid, signal.SIGHUP)


@dataclass(frozen=True)
class Effects:
    """What ``apply`` does beyond files under its root; each one replaceable."""

    set_clock: Callable[[int], None] = set_clock
    #: a note when the seed went in other than as asked, else None
    feed_rng: Callable[[bytes], str | None] = feed_rng
    set_hostname: Callable[[str], None] = set_kernel_hostname
    #: the SIGHUP that makes sshd (this pid) load its host keys again
    signal_sshd: Callable[[int], None] = hup


def recording_effects(root: str) -> Effects:
    """Effects that only append what they were asked to ``root/RECORD``, one JSON object
    a line: ``{"call": "set_clock", "arg": time_ns}`` (the seed as hex)."""

    def record(call: str, arg: Any) -> None:
        with open(os.path.join(root, RECORD), "a") as fh:
            fh.write(json.dumps({"call": call, "arg": arg}) + "\n")

    def rng(seed: bytes) -> None:
        record("feed_rng", seed.hex())

    return Effects(
        set_clock=lambda t: record("set_clock", t),
        feed_rng=rng,
        set_hostname=lambda name: record("set_hostname", name),
        signal_sshd=lambda pid: record("signal_sshd", pid),
    )


def root_from_env() -> str:
    """The root the agent's ``resume`` works under: / (BANGER_AGENT_IDENTITY_ROOT in tests)."""
    return os.environ.get(ROOT_ENV) or "/"


# --- files under the root ---------------------------------------------------------------
def _at(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _mode(path: str, default: int) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return default


def write_atomic(path: str, data: bytes, mode: int) -> None:
    """``path`` holding ``data`` with ``mode``, replaced in one rename (readers see the
    old file or the new one, never a part)."""
    tmp = path + ".banger-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, mode)  # before the data: a key is never readable by others
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _lines(text: str) -> bytes:
    return (text if text.endswith("\n") else text + "\n").encode()


def write_hostname(root: str, name: str, effects: Effects) -> None:
    """As set_identity() at boot: the kernel's hostname and the ``127.0.1.1`` line of
    /etc/hosts; and /etc/hostname when the image has one. Each step is tried."""
    failed: list[str] = []
    try:
        effects.set_hostname(name)
    except OSError as exc:
        failed.append(f"cannot set the hostname: {exc}")
    hosts = _at(root, "/etc/hosts")
    try:
        try:
            with open(hosts) as fh:
                lines = fh.read().strip().splitlines()
        except FileNotFoundError:
            lines = []
        want = f"127.0.1.1\t{name}"
        if want not in lines:
            kept = [ln for ln in lines if not ln.startswith("127.0.1.1")]
            write_atomic(hosts, "\n".join([*kept, want]).encode() + b"\n", _mode(hosts, 0o644))
    except OSError as exc:
        failed.append(f"cannot write /etc/hosts: {exc}")
    etc_hostname = _at(root, "/etc/hostname")
    if os.path.lexists(etc_hostname):
        try:
            write_atomic(etc_hostname, _lines(name), _mode(etc_hostname, 0o644))
        except OSError as exc:
            failed.append(f"cannot write /etc/hostname: {exc}")
    if failed:
        raise OSError("; ".join(failed))


def set_machine_id(root: str, machine_id: str) -> None:
    """/etc/machine-id (0444), and D-Bus's own copy when it is a file, not a link to it."""
    write_atomic(_at(root, "/etc/machine-id"), _lines(machine_id), 0o444)
    dbus = _at(root, "/var/lib/dbus/machine-id")
    if os.path.isfile(dbus) and not os.path.islink(dbus):
        write_atomic(dbus, _lines(machine_id), _mode(dbus, 0o444))


def set_ssh_host_keys(root: str, keys: dict[str, dict[str, str]]) -> None:
    """The ed25519 host key pair, and no other host key left."""
    ssh = _at(root, "/etc/ssh")
    private = os.path.join(ssh, "ssh_host_ed25519_key")
    write_atomic(private, _lines(keys["ed25519"]["private"]), 0o600)
    write_atomic(private + ".pub", _lines(keys["ed25519"]["public"]), 0o644)
    where = glob.escape(ssh)
    for old in sorted(glob.glob(f"{where}/ssh_host_*_key") + glob.glob(f"{where}/ssh_host_*_key.pub")):
        if old not in (private, private + ".pub"):
            os.unlink(old)


def _key_id(line: str) -> tuple[str, str]:
    """A public key line's identity: its type and base64 blob (not its comment)."""
    words = line.split()
    return (words[0], words[1]) if len(words) > 1 else (line, "")


def ssh_setup(
    root: str,
    host_keys: Any,
    authorized_keys: Any,
    revoke: Any = None,
    signal_sshd: Callable[[int], None] = hup,
) -> dict[str, Any]:
    """The ``ssh_setup`` op: the VM's own host key pair (others removed; a running sshd
    is told to reload) unless the image has no /etc/ssh (no sshd to use them); each of
    ``authorized_keys`` (public key lines) in root's ``~/.ssh/authorized_keys`` once
    (lines already there stay), and the keys in ``revoke`` (a key banger rotated out)
    taken out, matched by type and key, whatever the comment. Checked whole first:
    nothing is written when a field is bad."""
    keys = None
    if host_keys is not None:
        try:
            keys = _check_keys(host_keys)
        except BadRequest as exc:
            raise BadRequest("host_keys", str(exc).split(": ", 2)[-1], op="ssh_setup") from None
    for field, value in (("authorized_keys", authorized_keys), ("revoke", [] if revoke is None else revoke)):
        if not isinstance(value, list) or not all(isinstance(k, str) and PUBLIC_ANY_RE.fullmatch(k) for k in value):
            raise BadRequest(field, "expected a list of one-line public keys ('TYPE BASE64 [comment]')", op="ssh_setup")
    out: dict[str, Any] = {"host_keys": False, "authorized_keys": 0, "revoked": 0, "sshd": None}
    if keys is not None:
        if os.path.isdir(_at(root, "/etc/ssh")):
            set_ssh_host_keys(root, keys)
            out["host_keys"] = True
            pid = find_sshd(root)
            if pid is not None:
                signal_sshd(pid)
                out["sshd"] = pid
        else:
            out["skipped"] = {"host_keys": "no /etc/ssh: no sshd in this image"}
    if authorized_keys or revoke:
        ssh_dir = _at(root, "/root/.ssh")
        os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
        os.chmod(ssh_dir, 0o700)
        path = os.path.join(ssh_dir, "authorized_keys")
        try:
            with open(path) as fh:
                have = fh.read().splitlines()
        except FileNotFoundError:
            have = []
        gone = {_key_id(k) for k in revoke or ()} - {_key_id(k) for k in authorized_keys}
        kept = [ln for ln in have if _key_id(ln) not in gone]
        held = {_key_id(ln) for ln in kept}
        added = [k for k in authorized_keys if _key_id(k) not in held]
        if added or len(kept) != len(have) or not os.path.exists(path):
            write_atomic(path, "".join(f"{ln}\n" for ln in [*kept, *added]).encode(), 0o600)
        out["authorized_keys"], out["revoked"] = len(added), len(have) - len(kept)
    return out


def find_sshd(root: str = "/") -> int | None:
    """The listening sshd: of the processes named sshd, one whose parent is not an sshd
    (per-connection sshds are its children); the lowest such pid. None when none runs."""
    proc = _at(root, "/proc")
    try:  # sshd's own pid file (Debian's PidFile), when it names a listening sshd: no scan
        with open(_at(root, "/run/sshd.pid")) as fh:
            pid = int(fh.read().strip())
        with open(os.path.join(proc, str(pid), "comm")) as fh:
            if fh.read().strip() == "sshd" and _comm(proc, _ppid(proc, pid)) != "sshd":
                return pid
    except (OSError, ValueError):
        pass
    try:
        entries = os.listdir(proc)
    except OSError:
        return None
    pids: list[int] = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "comm")) as fh:
                if fh.read().strip() == "sshd":
                    pids.append(int(entry))
        except OSError:
            continue
    listeners = [pid for pid in pids if _ppid(proc, pid) not in pids]
    return min(listeners or pids, default=None)


def _comm(proc: str, pid: int | None) -> str | None:
    try:
        with open(os.path.join(proc, str(pid), "comm")) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _ppid(proc: str, pid: int) -> int | None:
    try:
        with open(os.path.join(proc, str(pid), "stat")) as fh:
            stat = fh.read()
        return int(stat[stat.rindex(")") + 1 :].split()[1])  # after "(comm)": state, ppid
    except (OSError, ValueError, IndexError):
        return None


# --- the op ----------------------------------------------------------------------------
def apply(req: dict[str, Any], root: str = "/", effects: Effects | None = None) -> dict[str, Any]:
    """Check ``req`` (BadRequest: nothing applied), then apply every part it names; the
    answer is the op's RESULT payload (see the module docstring)."""
    r = parse(req)
    if effects is None:
        effects = Effects() if os.path.realpath(root) == "/" else recording_effects(root)
    applied: list[str] = []
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    notes: dict[str, str] = {}
    took: dict[str, float] = {}  # ms per part: a restored guest is slow the first time through anything

    def part(name: str, do: Callable[[], str | None]) -> None:
        t = time.monotonic()
        try:
            note = do()
        except OSError as exc:
            errors[name] = str(exc)
            return
        finally:
            took[name] = round((time.monotonic() - t) * 1000, 1)
        applied.append(name)
        if note:
            notes[name] = note

    def clock() -> None:
        effects.set_clock(r.time_ns)

    part("clock", clock)
    part("rng", lambda: effects.feed_rng(r.seed))
    if r.hostname is not None:
        hostname = r.hostname
        part("hostname", lambda: write_hostname(root, hostname, effects))
    if r.machine_id is not None:
        machine_id = r.machine_id
        part("machine_id", lambda: set_machine_id(root, machine_id))
    if r.ssh_host_keys is not None:
        if not os.path.exists(_at(root, "/etc/ssh/sshd_config")):
            skipped["ssh_host_keys"] = "no sshd in this image"
        else:
            keys = r.ssh_host_keys
            part("ssh_host_keys", lambda: set_ssh_host_keys(root, keys))
            if "ssh_host_keys" in applied:
                t = time.monotonic()
                pid = find_sshd(root)
                took["find_sshd"] = round((time.monotonic() - t) * 1000, 1)
                if pid is None:
                    notes["ssh_host_keys"] = "no sshd running: it reads the keys when it starts"
                else:
                    try:
                        effects.signal_sshd(pid)
                        notes["ssh_host_keys"] = f"sshd (pid {pid}) told to reload (SIGHUP)"
                    except ProcessLookupError:
                        notes["ssh_host_keys"] = "sshd exited meanwhile: it reads the keys when it starts"
                    except OSError as exc:
                        errors["sshd_reload"] = f"cannot signal sshd (pid {pid}): {exc}"
    return {"applied": applied, "skipped": skipped, "errors": errors, "notes": notes, "ms": took}
