"""The agent's ``resume`` op (guest/banger_guest/identity.py): a VM restored from a
snapshot gets its own clock, RNG seed, hostname, machine-id and SSH host keys.

End to end through the real agent process and the real host channel over a socketpair,
with the agent's identity root a temp dir (BANGER_AGENT_IDENTITY_ROOT): every file is
written under it, and the clock, the RNG, the kernel's hostname and the SIGHUP to sshd
only go to the recording effects' file there. Nothing here changes the machine running
the tests (the effects that would are faked, in process, in the unit tests at the end).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from banger_core.models import VM_NAME_RE
from banger_guest import identity
from banger_guest import protocol as P
from test_agent_channel import agent_process, connect


SEED = bytes(range(64)).hex()
MACHINE_ID = "0123456789abcdef0123456789abcdef"
PRIVATE = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\n-----END OPENSSH PRIVATE KEY-----\n"
PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE5ld0tleU5ld0tleU5ld0tleU5ld0tleU5ldw== root@box2"
KEYS = {"ed25519": {"private": PRIVATE, "public": PUBLIC}}


def full_request(**over: Any) -> dict[str, Any]:
    req: dict[str, Any] = {
        "time_ns": time.time_ns(),  # now: harmless even if it ever reached a real clock
        "seed": SEED,
        "hostname": "box2",
        "machine_id": MACHINE_ID,
        "ssh_host_keys": KEYS,
    }
    req.update(over)
    return req


def make_root(root: Path, sshd: bool = True) -> Path:
    """A guest's files as a snapshot's source left them, and a /proc where an sshd
    listener (pid 300) has a connection child of a lower pid (120)."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tbox1\n::1\tlocalhost\n")
    (root / "etc/hostname").write_text("box1\n")
    (root / "etc/machine-id").write_text("f" * 32 + "\n")
    (root / "etc/machine-id").chmod(0o444)
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").write_text("f" * 32 + "\n")
    (root / "var/lib/dbus/machine-id").chmod(0o644)
    (root / "etc/ssh").mkdir()
    if sshd:
        (root / "etc/ssh/sshd_config").write_text("PermitRootLogin no\n")
    for kind in ("rsa", "ecdsa", "ed25519"):
        (root / f"etc/ssh/ssh_host_{kind}_key").write_text(f"old {kind} private\n")
        (root / f"etc/ssh/ssh_host_{kind}_key").chmod(0o600)
        (root / f"etc/ssh/ssh_host_{kind}_key.pub").write_text(f"old {kind} public\n")
    (root / "etc/ssh/ssh_config").write_text("Host *\n")
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/hostname").write_text("box1\n")
    procs = {1: ("init", 0), 120: ("sshd", 300), 300: ("sshd", 1), 400: ("sshd-session", 300), 500: ("bash", 1)}
    if not sshd:
        procs = {1: ("init", 0), 500: ("bash", 1)}
    for pid, (comm, ppid) in procs.items():
        (root / f"proc/{pid}").mkdir()
        (root / f"proc/{pid}/comm").write_text(comm + "\n")
        (root / f"proc/{pid}/stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560\n")
    return root


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under ``root``: its mode and its content (a link's target)."""
    out: dict[str, tuple[int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            data = os.readlink(path).encode()
        elif stat.S_ISREG(st.st_mode):
            data = path.read_bytes()
        else:
            data = b""
        out[str(path.relative_to(root))] = (st.st_mode, data)
    return out


def calls(root: Path) -> list[tuple[str, Any]]:
    record = root / identity.RECORD
    if not record.exists():
        return []
    return [(c["call"], c["arg"]) for c in map(json.loads, record.read_text().splitlines())]


@contextmanager
def agent_under(root: Path) -> Iterator[socket.socket]:
    """The agent process serving one end of a socketpair, its identity root ``root``."""
    assert root.resolve() != Path("/")
    with agent_process(**{identity.ROOT_ENV: str(root)}) as host:
        yield host


def resume(root: Path, *requests: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each request as a resume session to one agent: (RESULT|ERROR, its payload); the
    agent must still answer health afterwards."""

    async def main() -> list[tuple[str, dict[str, Any]]]:
        ch = await connect(host)
        out = []
        for req in requests:
            s = await ch.open({"op": "resume", **req})
            f = await asyncio.wait_for(s.result(), 10)
            out.append((P.NAMES[f.kind], f.obj()))
        assert (await ch.call({"op": "health"}, timeout=10))["version"] == P.VERSION
        await ch.close()
        return out

    with agent_under(root) as host:
        return asyncio.run(main())


def _machine() -> tuple[str, bytes | None]:
    try:
        mid = Path("/etc/machine-id").read_bytes()
    except OSError:
        mid = None
    return socket.gethostname(), mid


def test_resume_applies_everything_it_is_given(tmp_path):
    root = make_root(tmp_path / "root")
    machine = _machine()
    req = full_request()
    [(kind, result)] = resume(root, req)

    assert kind == "RESULT", result
    assert set(result.pop("ms")) == {"clock", "rng", "hostname", "machine_id", "ssh_host_keys", "find_sshd"}
    assert result == {
        "applied": ["clock", "rng", "hostname", "machine_id", "ssh_host_keys"],
        "skipped": {},
        "errors": {},
        "notes": {"ssh_host_keys": "sshd (pid 300) told to reload (SIGHUP)"},
    }
    # the effects, in order; the listener (not its lower-pid connection child) signalled
    assert calls(root) == [
        ("set_clock", req["time_ns"]),
        ("feed_rng", SEED),
        ("set_hostname", "box2"),
        ("signal_sshd", 300),
    ]
    assert (root / "etc/hosts").read_text() == "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\tbox2\n"
    assert (root / "etc/hostname").read_text() == "box2\n"
    for path, mode in (("etc/machine-id", 0o444), ("var/lib/dbus/machine-id", 0o644)):
        assert (root / path).read_text() == MACHINE_ID + "\n"
        assert stat.S_IMODE((root / path).stat().st_mode) == mode, path
    ssh = root / "etc/ssh"
    assert sorted(p.name for p in ssh.iterdir()) == [
        "ssh_config",
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
        "sshd_config",
    ]
    assert (ssh / "ssh_host_ed25519_key").read_text() == PRIVATE
    assert (ssh / "ssh_host_ed25519_key.pub").read_text() == PUBLIC + "\n"
    assert stat.S_IMODE((ssh / "ssh_host_ed25519_key").stat().st_mode) == 0o600
    assert stat.S_IMODE((ssh / "ssh_host_ed25519_key.pub").stat().st_mode) == 0o644
    assert not list(root.rglob("*.banger-tmp"))
    assert (root / "proc/sys/kernel/hostname").read_text() == "box1\n"  # that write is an effect: recorded only
    assert _machine() == machine  # and the machine running the tests is untouched


BAD = [
    ({"time_ns": 0}, "time_ns"),
    ({"time_ns": -5}, "time_ns"),
    ({"time_ns": True}, "time_ns"),
    ({"time_ns": 1.5e18}, "time_ns"),
    ({"time_ns": str(time.time_ns())}, "time_ns"),
    ({"time_ns": 2**63}, "time_ns"),
    ({"time_ns": None}, "time_ns"),
    ({"seed": "ab" * 31}, "seed"),  # 31 bytes
    ({"seed": "ab" * 513}, "seed"),
    ({"seed": "ab" * 32 + "a"}, "seed"),  # odd
    ({"seed": "zz" * 32}, "seed"),
    ({"seed": "ab " * 32}, "seed"),  # bytes.fromhex would take the spaces
    ({"seed": None}, "seed"),
    ({"seed": list(range(64))}, "seed"),
    ({"hostname": "Box2"}, "hostname"),
    ({"hostname": "-box"}, "hostname"),
    ({"hostname": "box-"}, "hostname"),
    ({"hostname": "b" * 64}, "hostname"),
    ({"hostname": "box\n"}, "hostname"),
    ({"hostname": "box.example"}, "hostname"),
    ({"hostname": ""}, "hostname"),
    ({"hostname": 7}, "hostname"),
    ({"machine_id": "0" * 32}, "machine_id"),
    ({"machine_id": MACHINE_ID.upper()}, "machine_id"),
    ({"machine_id": MACHINE_ID[:-1]}, "machine_id"),
    ({"machine_id": MACHINE_ID + "\n"}, "machine_id"),
    ({"machine_id": 12}, "machine_id"),
    ({"ssh_host_keys": {"rsa": KEYS["ed25519"]}}, "ssh_host_keys"),
    ({"ssh_host_keys": {"ed25519": {"private": PRIVATE}}}, "ssh_host_keys"),
    ({"ssh_host_keys": {"ed25519": {"private": "secret", "public": PUBLIC}}}, "ssh_host_keys"),
    ({"ssh_host_keys": {"ed25519": {"private": PRIVATE, "public": "ssh-rsa AAAA"}}}, "ssh_host_keys"),
    ({"ssh_host_keys": {"ed25519": {"private": PRIVATE, "public": PUBLIC + "\nssh-ed25519 AAAA"}}}, "ssh_host_keys"),
    ({"ssh_host_keys": "yes"}, "ssh_host_keys"),
    ({"hostnme": "box2"}, "hostnme"),  # a typo is not silently nothing
]


def test_a_bad_field_of_each_kind_is_refused_by_name_and_nothing_is_applied(tmp_path):
    root = make_root(tmp_path / "root")
    before = tree(root)
    missing = []
    for field in ("time_ns", "seed"):  # the two fields that are not optional
        req = full_request()
        del req[field]
        missing.append((req, field))
    cases = [(full_request(**over), field) for over, field in BAD] + missing
    answers = resume(root, *(req for req, _ in cases))

    for (req, field), (kind, obj) in zip(cases, answers, strict=True):
        assert kind == "ERROR" and obj["field"] == field and f"resume: bad {field}: " in obj["message"], (req, obj)
    assert PRIVATE.splitlines()[1] not in json.dumps(answers)  # a key is never echoed
    assert calls(root) == []
    assert tree(root) == before


def test_ssh_keys_are_skipped_in_an_image_without_sshd(tmp_path):
    root = make_root(tmp_path / "root", sshd=False)
    old_keys = {p.name: p.read_bytes() for p in (root / "etc/ssh").iterdir()}
    [(kind, result)] = resume(root, full_request())

    assert kind == "RESULT"
    assert result["applied"] == ["clock", "rng", "hostname", "machine_id"]
    assert result["skipped"] == {"ssh_host_keys": "no sshd in this image"} and result["errors"] == {}
    assert {p.name: p.read_bytes() for p in (root / "etc/ssh").iterdir()} == old_keys
    assert [c for c, _ in calls(root)] == ["set_clock", "feed_rng", "set_hostname"]


def test_one_part_failing_is_reported_and_the_others_still_apply(tmp_path):
    root = make_root(tmp_path / "root")
    (root / "etc/machine-id").unlink()
    (root / "etc/machine-id").mkdir()  # what it cannot replace (EISDIR)
    [(kind, result)] = resume(root, full_request())

    assert kind == "RESULT"
    assert result["applied"] == ["clock", "rng", "hostname", "ssh_host_keys"]
    assert list(result["errors"]) == ["machine_id"] and "machine-id" in result["errors"]["machine_id"]
    assert (root / "etc/hostname").read_text() == "box2\n"
    assert (root / "etc/ssh/ssh_host_ed25519_key").read_text() == PRIVATE
    assert (root / "var/lib/dbus/machine-id").read_text() == "f" * 32 + "\n"  # after the failed one: not reached
    assert not list(root.rglob("*.banger-tmp"))


def test_only_what_is_given_is_done_and_links_and_absent_files_are_left_alone(tmp_path):
    root = make_root(tmp_path / "root")
    (root / "etc/hostname").unlink()
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n")
    dbus = root / "var/lib/dbus/machine-id"
    dbus.unlink()
    dbus.symlink_to("/etc/machine-id")
    [(kind, only_clock_rng), (kind2, result)] = resume(
        root,
        {"time_ns": 1_700_000_000_000_000_000, "seed": SEED, "hostname": None, "machine_id": None, "ssh_host_keys": None},
        {"time_ns": 1_700_000_000_000_000_000, "seed": SEED, "hostname": "box2", "machine_id": MACHINE_ID},
    )

    assert kind == kind2 == "RESULT"
    assert set(only_clock_rng.pop("ms")) == {"clock", "rng"}
    assert only_clock_rng == {"applied": ["clock", "rng"], "skipped": {}, "errors": {}, "notes": {}}
    assert result["applied"] == ["clock", "rng", "hostname", "machine_id"] and not result["errors"]
    assert not (root / "etc/hostname").exists()  # written only when the image has one
    assert (root / "etc/hosts").read_text() == "127.0.0.1\tlocalhost\n127.0.1.1\tbox2\n"
    assert os.readlink(dbus) == "/etc/machine-id"  # a link to /etc/machine-id: followed by readers, not replaced
    assert (root / "etc/ssh/ssh_host_rsa_key").exists()


# --- in process: the effects that would touch the machine, faked -------------------------
class Fakes:
    def __init__(self, fail: dict[str, OSError] | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail = fail or {}

    def _call(self, name: str, arg: Any) -> None:
        self.calls.append((name, arg))
        if name in self.fail:
            raise self.fail[name]

    def effects(self, rng_note: str | None = None) -> identity.Effects:
        def rng(seed: bytes) -> str | None:
            self._call("feed_rng", seed)
            return rng_note

        return identity.Effects(
            set_clock=lambda t: self._call("set_clock", t),
            feed_rng=rng,
            set_hostname=lambda name: self._call("set_hostname", name),
            signal_sshd=lambda pid: self._call("signal_sshd", pid),
        )


def test_a_failing_effect_is_an_error_of_its_part_only(tmp_path):
    root = make_root(tmp_path / "root")
    fakes = Fakes({"set_clock": PermissionError(errno.EPERM, "Operation not permitted"), "signal_sshd": PermissionError(1, "no")})
    result = identity.apply(full_request(), str(root), fakes.effects(rng_note="uncredited"))

    assert result["applied"] == ["rng", "hostname", "machine_id", "ssh_host_keys"]
    assert result["errors"] == {
        "clock": "[Errno 1] Operation not permitted",
        "sshd_reload": "cannot signal sshd (pid 300): [Errno 1] no",
    }
    assert result["notes"] == {"rng": "uncredited"}
    assert [c for c, _ in fakes.calls] == ["set_clock", "feed_rng", "set_hostname", "signal_sshd"]
    assert fakes.calls[1] == ("feed_rng", bytes(range(64)))

    # the kernel hostname failing does not stop the files
    fakes = Fakes({"set_hostname": PermissionError(errno.EPERM, "Operation not permitted")})
    result = identity.apply(full_request(hostname="box3"), str(root), fakes.effects())
    assert "hostname" not in result["applied"] and "cannot set the hostname" in result["errors"]["hostname"]
    assert (root / "etc/hostname").read_text() == "box3\n"

    # an sshd gone between the scan and the signal: its next start reads the keys
    fakes = Fakes({"signal_sshd": ProcessLookupError(errno.ESRCH, "No such process")})
    result = identity.apply(full_request(), str(root), fakes.effects())
    assert result["applied"][-1] == "ssh_host_keys" and not result["errors"] and "exited" in result["notes"]["ssh_host_keys"]


def test_without_given_effects_a_root_other_than_slash_only_records(tmp_path, monkeypatch):
    root = make_root(tmp_path / "root")
    identity.apply({"time_ns": 5, "seed": SEED}, str(root))
    assert calls(root) == [("set_clock", 5), ("feed_rng", SEED)]
    # in a VM: the root is /, the effects the real ones (looked at here, never called)
    monkeypatch.delenv(identity.ROOT_ENV, raising=False)
    assert identity.root_from_env() == "/"
    real = identity.Effects()
    assert (real.set_clock, real.feed_rng, real.set_hostname, real.signal_sshd) == (
        identity.set_clock,
        identity.feed_rng,
        identity.set_kernel_hostname,
        identity.hup,
    )


def test_the_hostname_rule_is_the_vm_name_rule():
    assert identity.HOSTNAME_RE.pattern == VM_NAME_RE.pattern


def test_find_sshd_prefers_the_listener_and_reads_nothing_else(tmp_path):
    root = make_root(tmp_path / "root")
    assert identity.find_sshd(str(root)) == 300
    (root / "proc/300/stat").unlink()  # the listener's parent unknown: still not a child of an sshd
    assert identity.find_sshd(str(root)) == 300
    (root / "proc/300/comm").write_text("sshd-session\n")  # only children left: the lowest
    assert identity.find_sshd(str(root)) == 120
    assert identity.find_sshd(str(make_root(tmp_path / "none", sshd=False))) is None
    assert identity.find_sshd(str(tmp_path / "no-proc")) is None


class FakeIoctl:
    def __init__(self, fail: dict[int, int] | None = None) -> None:
        self.calls: list[tuple[int, Any]] = []
        self.fail = fail or {}

    def __call__(self, fd: int, request: int, arg: Any = 0, mutate: bool = True) -> int:
        self.calls.append((request, arg))
        if request in self.fail:
            raise OSError(self.fail[request], os.strerror(self.fail[request]))
        return 0


def test_feed_rng_credits_every_bit_then_reseeds(tmp_path, monkeypatch):
    import fcntl

    device = tmp_path / "urandom"
    device.write_bytes(b"")
    seed = os.urandom(64)
    ioctl = FakeIoctl()
    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    assert identity.feed_rng(seed, str(device)) is None
    (add, info), (reseed, arg) = ioctl.calls
    assert (add, reseed) == (0x40085203, 0x5207) and arg == 0
    assert struct.unpack("ii", info[:8]) == (512, 64) and info[8:] == seed
    assert device.read_bytes() == b""  # credited through the ioctl, not written

    # an old kernel without RNDRESEEDCRNG: credited, said so
    monkeypatch.setattr(fcntl, "ioctl", FakeIoctl({identity.RNDRESEEDCRNG: errno.EINVAL}))
    assert "no RNDRESEEDCRNG" in (identity.feed_rng(seed, str(device)) or "")

    # no right to credit: written uncredited, said so
    monkeypatch.setattr(fcntl, "ioctl", FakeIoctl({identity.RNDADDENTROPY: errno.EPERM}))
    assert "uncredited" in (identity.feed_rng(seed, str(device)) or "")
    assert device.read_bytes() == seed

    # anything else is the part's error
    monkeypatch.setattr(fcntl, "ioctl", FakeIoctl({identity.RNDADDENTROPY: errno.EBADF}))
    with pytest.raises(OSError):
        identity.feed_rng(seed, str(device))


def test_find_sshd_takes_sshds_pid_file_when_it_names_the_listener(tmp_path):
    root = make_root(tmp_path)
    (root / "run").mkdir(exist_ok=True)
    (root / "run/sshd.pid").write_text("300\n")
    assert identity.find_sshd(str(root)) == 300
    (root / "run/sshd.pid").write_text("120\n")  # a connection child: not the listener, so the scan decides
    assert identity.find_sshd(str(root)) == 300
    (root / "run/sshd.pid").write_text("500\n")  # a stale file naming another program: the scan decides
    assert identity.find_sshd(str(root)) == 300
    (root / "run/sshd.pid").write_text("junk")
    assert identity.find_sshd(str(root)) == 300
