"""The host<->guest wire format: the one definition, imported by the guest agent and by
the host side (the ``agent`` plugin). Standard library only.

A channel (a virtio-serial port, or a vsock connection) carries frames::

    MAGIC(4) KIND(1) SESSION(u32) LENGTH(u32) CRC32(u32) PAYLOAD(LENGTH)

big-endian; the CRC covers KIND, SESSION, LENGTH and PAYLOAD. A reader that meets
bytes that are not a valid frame (the tail of a frame cut when the host side went
away: a virtio-serial port drops what is written while no host is connected) skips
forward to the next MAGIC and tries again, so it resynchronises on the next frame.

Every connection starts with the host's ``SYNC`` then ``HELLO`` ``{"nonce",
"version"}``. The agent then drops every session (killing their processes) and answers
``SYNC`` then ``WELCOME`` with the same nonce; the host ignores everything before that ``WELCOME``. Then any number of
sessions run at once, each opened by the host with ``OPEN`` on a new session id and
ended by the agent's ``EXIT``, ``RESULT`` or ``ERROR``; the host may ``CLOSE`` one (its
process group is killed). JSON payloads are UTF-8 objects; STDIN/STDOUT/STDERR payloads
are raw bytes. The ops an ``OPEN`` names:

- ``{"op": "exec", "argv", "env", "cwd", "user", "stdin", "tty"}``: a command; with
  ``"tty": {"rows", "cols", "term"}`` on a pseudo-terminal of its own (its output all
  on STDOUT; ``RESIZE`` changes the window), else on pipes. Ends with ``EXIT``.
- ``{"op": "cp_out", "path"}``: ``path`` (a file or a tree) as a tar stream on STDOUT;
  ``{"op": "cp_in", "dest", "parents"}``: a tar stream on STDIN extracted at ``dest``
  (``transfer.py`` is that stream's one definition); with ``"parents": true``,
  ``dest`` and its missing parents are made as directories first (``mkdir -p``), so
  the stream's entries land inside it under their own names. Both end with ``EXIT``.
- ``{"op": "ports"}``: the guest's listeners as one JSON array on STDOUT (``ports.py``).
- ``{"op": "watch_ports", "interval"}``: the listeners (as ``ports`` gives them, not
  probed) as a JSON array on one line of STDOUT now, and another each time the set of
  listening sockets changes (checked every ``interval`` s, default 0.5): the guest
  pushes, the host does not poll. Runs until the host ``CLOSE``s the session.
- ``{"op": "tcp_connect", "host", "port"}``: a TCP connection to ``host`` (an IP
  address, default 127.0.0.1) and ``port`` in the guest: STDIN goes to it (STDIN_EOF
  shuts its write side), what it sends comes as STDOUT; ``EXIT`` 0 once it closed, 1
  (the reason on STDERR) when it could not connect. How the host reaches a listener
  bound to the guest's loopback.
- ``{"op": "ssh_setup", "host_keys", "authorized_keys", "revoke"}``: the VM's own SSH
  host key pair (``{"ed25519": {"private", "public"}}`` or null; others removed, a
  running sshd reloads; skipped without /etc/ssh), public key lines root's
  authorized_keys must hold (added once) and ones it must not (``revoke``, optional:
  keys rotated out, matched by type and key); one ``RESULT`` ``{"host_keys",
  "authorized_keys": N added, "revoked": N, "sshd": pid}`` or an ``ERROR``.
- ``{"op": "health"}``, ``{"op": "poweroff"}``: one ``RESULT``.
- ``{"op": "resume", "time_ns", "seed", "hostname", "machine_id", "ssh_host_keys"}``:
  right after a restore from a snapshot, the VM's own clock, RNG seed, hostname,
  machine-id and SSH host keys (``identity.py``); one ``RESULT`` ``{"applied",
  "skipped", "errors", "notes"}``, or an ``ERROR`` naming the bad field (nothing applied).

Flow control: output needs none from the protocol (the agent stops reading a
command's output while 4 MiB wait to be sent, the host stops reading the channel while
a session's frames wait for their consumer). Input has a window: the host sends a
session at most ``STDIN_WINDOW`` bytes of STDIN beyond what the agent has acknowledged
with ``STDIN_ACK`` (bytes written to the command, or dropped once it closed its stdin),
so a command that reads slowly, or never, costs the agent at most the window and never
stalls the channel for the other sessions.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

# 2: tty exec, RESIZE, cp_in/cp_out, ports; 3: resume; 4: net; 5: watch_ports, tcp_connect,
# ssh_setup; 6: cp_in parents, ssh_setup revoke
VERSION = 6
MAGIC = b"\xb4BG\x01"
HEADER = struct.Struct(">4sBIII")
MAX_PAYLOAD = 64 * 1024

HELLO = 1  # host: {"nonce": str, "version": int}
WELCOME = 2  # agent: {"nonce", "version", "agent", "boot_id", "uptime"}
OPEN = 3  # host: a new session {"op": ...}
STDIN = 4  # host: bytes for the session's stdin
STDIN_EOF = 5  # host: no more stdin
STDOUT = 6  # agent: bytes
STDERR = 7  # agent: bytes
SIGNAL = 8  # host: {"signal": N} for the session's process group
EXIT = 9  # agent: {"status": N} (128+N for signal N); the session is over
RESULT = 10  # agent: a JSON result (health, poweroff, resume); the session is over
ERROR = 11  # agent: {"message": str}; the session is over
CLOSE = 12  # host: kill the session's process group and forget it
RESIZE = 13  # host: {"rows": N, "cols": N} for a session's terminal (exec with "tty")
STDIN_ACK = 14  # agent: {"written": N}, the session's stdin bytes handed to its command so far

#: how many stdin bytes the host may send a session beyond the last STDIN_ACK: the
#: agent then holds at most this much per session, however slowly its command reads
STDIN_WINDOW = 4 << 20

#: sent before HELLO and before WELCOME: longer than any frame, and holding no MAGIC, so
#: a reader stuck on the cut header of a frame that will never complete fails its CRC
#: and resynchronises on the frame that follows
SYNC = b"\0" * (HEADER.size + MAX_PAYLOAD)

NAMES = {v: k for k, v in globals().items() if k.isupper() and isinstance(v, int) and 1 <= v <= 14}
JSON_KINDS = frozenset({HELLO, WELCOME, OPEN, SIGNAL, EXIT, RESULT, ERROR, RESIZE, STDIN_ACK})
ENDS = frozenset({EXIT, RESULT, ERROR})


class ProtocolError(ValueError):
    """A frame that cannot be made or a JSON payload that is not an object."""


@dataclass(frozen=True)
class Frame:
    kind: int
    session: int
    payload: bytes = b""

    def obj(self) -> dict[str, Any]:
        """The JSON object a JSON frame carries."""
        try:
            value = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"{NAMES.get(self.kind, self.kind)} frame: not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ProtocolError(f"{NAMES.get(self.kind, self.kind)} frame: not a JSON object")
        return value

    def __repr__(self) -> str:
        return f"Frame({NAMES.get(self.kind, self.kind)}, session={self.session}, {len(self.payload)} bytes)"


def _crc(kind: int, session: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack(">BII", kind, session, len(payload)))) & 0xFFFFFFFF


def encode(kind: int, session: int, payload: bytes = b"") -> bytes:
    """One frame's bytes."""
    if kind not in NAMES:
        raise ProtocolError(f"unknown frame kind {kind}")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, kind, session, len(payload), _crc(kind, session, payload)) + payload


def encode_json(kind: int, session: int, obj: dict[str, Any]) -> bytes:
    return encode(kind, session, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def encode_data(kind: int, session: int, data: bytes) -> list[bytes]:
    """``data`` as frames of at most MAX_PAYLOAD bytes each (none for no data)."""
    view = memoryview(data)
    return [encode(kind, session, bytes(view[i : i + MAX_PAYLOAD])) for i in range(0, len(view), MAX_PAYLOAD)]


class Decoder:
    """Bytes in, whole frames out; garbage between frames is skipped (``skipped``
    counts the bytes thrown away while resynchronising)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.skipped = 0

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        buf = self._buf
        while True:
            at = buf.find(MAGIC)
            if at < 0:
                keep = len(MAGIC) - 1  # a MAGIC may be split across reads
                if len(buf) > keep:
                    self.skipped += len(buf) - keep
                    del buf[: len(buf) - keep]
                return out
            if at:
                self.skipped += at
                del buf[:at]
            if len(buf) < HEADER.size:
                return out
            _magic, kind, session, length, crc = HEADER.unpack_from(buf)
            if kind not in NAMES or length > MAX_PAYLOAD:
                self.skipped += 1
                del buf[:1]  # not a frame start after all: look for the next MAGIC
                continue
            end = HEADER.size + length
            if len(buf) < end:
                return out
            payload = bytes(buf[HEADER.size : end])
            if _crc(kind, session, payload) != crc:
                self.skipped += 1
                del buf[:1]
                continue
            del buf[:end]
            out.append(Frame(kind, session, payload))
