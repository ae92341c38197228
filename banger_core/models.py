"""Pydantic models for what banger stores and what crosses its boundaries."""

from __future__ import annotations

import enum
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from banger_core.checks import VM_NAME_RE as VM_NAME_RE
from banger_core.checks import parse_size_mib as parse_size_mib
from banger_core.checks import validate_vm_name as validate_vm_name


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _host_path(v: str) -> str:
    """A path on this host as a client may send it: one the kernel can take at all."""
    if "\x00" in v:
        raise ValueError("a path cannot contain NUL bytes")
    if len(v.encode()) >= 4096 or any(len(part.encode()) > 255 for part in v.split("/")):
        raise ValueError("path too long (4095 bytes at most, 255 per component)")
    return v


#: a host path in RPC params or config: an over-long one is refused here, not as ENAMETOOLONG later
HostPath = Annotated[str, AfterValidator(_host_path)]


def fullmatching(pattern: str, what: str) -> AfterValidator:
    """A validator for ``Annotated[str, fullmatching(...)]``: the whole string must match
    (Python's ``re.fullmatch``; pydantic's own ``pattern=`` searches unless anchored)."""
    rx = re.compile(pattern)

    def check(v: str) -> str:
        if not rx.fullmatch(v):
            raise ValueError(f"expected {what}, got {v[:200]!r}")
        return v

    return AfterValidator(check)


#: A size in MiB that also takes "512M"/"8G" strings (see ``parse_size_mib``).
SizeMiB = Annotated[int, BeforeValidator(parse_size_mib)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Input(BaseModel):
    """The base of everything that crosses a boundary into banger: config tables, RPC
    params, plugin settings. Unknown keys are refused, nothing is coerced (no "30" for
    30, no true for 1), and defaults are validated like given values."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class VMState(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"  # the VMM runs, the guest's vCPUs do not (vm pause / vm resume)
    STOPPED = "stopped"
    # no VMM; its memory and devices wait in a suspend image (vm stop --suspend); the
    # next start resumes from it, or boots (saying why) when it cannot be used
    SUSPENDED = "suspended"
    ERROR = "error"

    @property
    def live(self) -> bool:
        """A VMM process belongs to the VM (running or paused; not suspended)."""
        return self in (VMState.RUNNING, VMState.PAUSED)


class VMSpec(Strict):
    vcpus: int = Field(gt=0)
    memory_mib: int = Field(gt=0)
    root_size_mib: int = Field(gt=0)
    kernel: str | None = None  # boot this kernel instead of the image's kernel_ref


class VM(Strict):
    id: str
    name: str
    state: VMState = VMState.CREATED
    image: str | None = None
    spec: VMSpec
    driver: str = "qemu"
    disk_strategy: str | None = None
    guest_ip: str | None = None
    project_dir: str | None = None
    last_error: str | None = None
    # What teardown needs even if handles.json is lost (tap name, nat rules, ...),
    # keyed by plugin name. Durable: lives in SQLite.
    teardown: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Per-VM plugin options as given (plugin -> field -> value), validated by each
    # plugin's vm_options model; defaults stay the model's. Durable.
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Deleted by the daemon when the run that made it ends (``vm run --rm``); one left by
    # a daemon that died is deleted when the next one reconciles. Durable.
    ephemeral: bool = False
    # The snapshot this VM was restored (or warm-started) from: its disk stands on that
    # snapshot's layer, so the snapshot is not deleted while the VM exists. Durable.
    base_snapshot: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_vm_name(v)


class SnapshotKind(str, enum.Enum):
    USER = "user"  # vm snapshot
    TEMPLATE = "template"  # made for warm `vm run`s (image warm, or the first run)
    FORK = "fork"  # made by `vm fork` for its forks; goes with the last of them


class Snapshot(Strict):
    """A VM frozen at one instant: device state and memory (the driver's files) and
    its root disk as a read-only layer, in its own directory (``Paths.snapshot_dir``)."""

    id: str
    name: str
    kind: SnapshotKind = SnapshotKind.USER
    vm_id: str  # the source (it may be gone since)
    vm_name: str
    image: str | None = None
    spec: VMSpec
    driver: str
    disk_strategy: str
    project_dir: str | None = None
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: what a restore must match (``vm.snapshots.compat``): kernel, devices, VMM, agent
    compat: dict[str, Any] = Field(default_factory=dict)
    #: a template's key (``vm.snapshots.template_key``); None for a user snapshot
    key: str | None = None
    #: the snapshot the source VM stood on: this one's disk layer may be an overlay of
    #: that one's, so that one is not deleted while this one exists
    base_snapshot: str | None = None
    boot_id: str | None = None  # the guest's, when its agent said
    size_bytes: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not VM_NAME_RE.fullmatch(v):
            raise ValueError(
                f"invalid snapshot name {v!r}: use 1-63 lowercase letters, digits and hyphens, "
                "starting and ending with a letter or digit"
            )
        return v


class Resumed(Strict):
    """What ``vm_resumed`` tells plugins: this VM continues from a snapshot instead of
    booting. ``new_identity``: it is a new VM (a restore, a warm start) and must stop
    being its source (hostname, machine-id, RNG, keys, addresses); False when the VM
    resumes itself (``vm stop --suspend`` then ``vm start``)."""

    snapshot: str  # the snapshot's name ("" for a suspend image)
    kind: str  # "restore", "fork", "template" or "suspend"
    source_vm: str  # the name of the VM the snapshot was taken from
    #: its ID (it may be gone since); None when not known
    source_vm_id: str | None = None
    new_identity: bool
    taken_at: datetime


class Image(Strict):
    name: str
    rootfs: str
    kernel_ref: str | None = None
    managed: bool = False
    sha256: str | None = None
    init: str | None = None  # kernel init= for images whose own init is not /sbin/init
    source: str | None = None  # where it came from: catalog name, OCI ref@digest, file
    created_at: datetime = Field(default_factory=utcnow)


class Kernel(Strict):
    name: str
    # What QEMU boots by default: a bzImage (on -M pc) or an ELF vmlinux (on -M microvm).
    kernel: str
    # The uncompressed ELF kernel, when there is one: Firecracker boots only this.
    vmlinux: str | None = None
    initrd: str | None = None
    modules: str | None = None
    # Where it came from: "recipe:NAME/REV", "bundle:SHA256" or "import:PATH"; a catalog
    # kernel whose source differs from what a pull would record now is stale.
    source: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class VMHandles(Strict):
    """Transient handles of a running VM: in memory, mirrored to ``handles.json``."""

    vm_id: str
    pid: int | None = None
    driver: str | None = None
    api_socket: str | None = None
    devices: dict[str, str] = Field(default_factory=dict)
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)


# --- the VMM-neutral machine description that plugins extend in configure_machine ---


class Drive(Strict):
    id: str
    path: str
    read_only: bool = False
    root: bool = False


MAC_RE = r"[0-9a-f]{2}(:[0-9a-f]{2}){5}"
USER_NET_DEFAULT = "10.0.2.0/24"


class HostForward(Strict):
    """A port of the host that leads to a port of the guest through a user-mode NIC
    (QEMU's ``hostfwd``): ``host_address:host_port`` -> the guest's ``guest_port``."""

    proto: Literal["tcp", "udp"]
    host_address: str = "127.0.0.1"
    host_port: int = Field(ge=0, lt=65536)  # 0: the VMM picks one (a driver may not support it)
    guest_port: int = Field(gt=0, lt=65536)

    @field_validator("host_address")
    @classmethod
    def _ipv4(cls, v: str) -> str:
        import ipaddress

        return str(ipaddress.IPv4Address(v))

    def spec(self) -> str:
        return f"{self.proto}:{self.host_address}:{self.host_port}"


class NIC(Strict):
    """A network device. ``kind="tap"``: backed by the host TAP device ``tap``.
    ``kind="user"``: the VMM's own user-mode network stack (QEMU's slirp), nothing on
    the host: the guest is ``net``'s 15th address, the gateway its 2nd (which leads to
    the host's loopback), the DNS forwarder its 3rd; ``forwards`` are set up at start
    (and added or removed later through the driver)."""

    id: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
    mac: str = Field(pattern=MAC_RE)
    kind: Literal["tap", "user"] = "tap"
    tap: str | None = None
    net: str | None = None
    forwards: list[HostForward] = Field(default_factory=list)

    @model_validator(mode="after")
    def _backend(self) -> "NIC":
        if self.kind == "tap" and not self.tap:
            raise ValueError("a tap NIC needs its TAP device (tap=)")
        if self.kind == "user":
            if self.tap:
                raise ValueError("a user-mode NIC has no TAP device")
            self.net = str(user_net(self.net or USER_NET_DEFAULT).network)
        elif self.net or self.forwards:
            raise ValueError("net= and forwards= are for user-mode NICs")
        return self


class UserNet(Strict):
    """The addresses of a user-mode NIC's network (QEMU's conventions)."""

    network: str
    prefixlen: int
    guest: str
    gateway: str
    dns: str


def user_net(net: str) -> UserNet:
    import ipaddress

    n = ipaddress.IPv4Network(net, strict=True)
    if n.prefixlen > 27:
        raise ValueError(f"user-mode network {net}: must be /27 or larger")
    return UserNet(network=str(n), prefixlen=n.prefixlen, guest=str(n[15]), gateway=str(n[2]), dns=str(n[3]))


class AgentChannel(Strict):
    kind: Literal["vsock", "serial"]
    host_path: str
    guest_cid: int | None = None


class Listener(Strict):
    """A socket listening in a guest (``vm ports``), as the guest agent reports it."""

    proto: Literal["tcp", "udp"]
    address: str
    port: int = Field(gt=0, lt=65536)
    family: Literal[4, 6, "4+6"]
    pid: int | None = None
    process: str = ""
    command: str = ""
    scheme: Literal["", "http", "https"] = ""  # found by probing from inside the guest


class Machine(Strict):
    kernel: str
    vmlinux: str | None = None  # the ELF form of ``kernel``, for VMMs that boot only ELF
    initrd: str | None = None
    boot_args: list[str] = Field(default_factory=list)
    vcpus: int = Field(gt=0)
    memory_mib: int = Field(gt=0)
    drives: list[Drive] = Field(default_factory=list)
    nics: list[NIC] = Field(default_factory=list)
    agent: AgentChannel | None = None
    console_log: str | None = None


M = TypeVar("M", bound=BaseModel)


def validate_input(model: type[M], data: Any, context: Any = None) -> M:
    """Validate data that arrived as JSON or TOML against any model, strictly.

    Strict in JSON mode: strings are never numbers, booleans never integers, but a
    string still makes a Path, an enum member or a datetime as it would from JSON. Used
    for RPC params and plugin settings, so a third party's model is as strict as the
    core's. ``context`` is pydantic's validation context (``ValidationInfo.context``).
    """
    import json

    return model.model_validate_json(json.dumps(data, default=str), strict=True, context=context)
