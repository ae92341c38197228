"""The hooks a banger plugin can implement, in lifecycle order.

Call convention: the core always calls hooks with keyword arguments, so an
implementation may accept any subset of a hook's parameters, and new parameters can be
added later without breaking existing plugins.

Registry hooks (``register_*``) receive a ``register`` callable and return nothing.
Lifecycle hooks are called per plugin, in the order resolved from each plugin's
declared ``requires``/``provides`` (setup stages forward, ``cleanup`` in reverse);
see docs/plugins.md for the diagram.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import sqlite_utils
    import typer
    from pydantic import BaseModel

    from banger_core.context import CheckFn, DoctorContext, ExecContext, FieldsContext, ReconcileContext, StageContext
    from banger_core.daemon.state import DaemonState
    from banger_core.runtime import Runtime
    from banger_core.sources import GuestFile, Source
    from banger_core.models import Listener, Machine, Resumed

PROJECT = "banger"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# ---------------------------------------------------------------------------------
# Contribution: what a plugin adds to banger (called when plugins load)
# ---------------------------------------------------------------------------------


@hookspec
def config_model() -> "type[BaseModel] | None":
    """Return the pydantic model of this plugin's settings.

    The user's ``config.toml`` table ``[<plugin name>]``, merged with the same table of
    a project's ``banger.toml``, is validated by it; the validated instance is handed
    to every lifecycle hook as ``ctx.settings``. Errors name the file, table and key.
    Asked once per process per plugin; the result is cached. Added in 0.1.
    """


@hookspec
def vm_options() -> "type[BaseModel] | None":
    """Return the pydantic model of this plugin's per-VM options (e.g. ``nat: bool``).

    Each field becomes a flag of ``vm create`` and ``vm set``: a bool field ``nat``
    gives ``--nat/--no-nat``, any other field ``--<field-name> VALUE`` (``_`` written
    ``-``; prefixed ``--<plugin>-`` when another plugin or banger has that flag). VALUE
    is an int, float or str for those types, the text as given for a type that parses
    text itself (``Annotated`` with a ``BeforeValidator``, e.g.
    ``banger_core.models.SizeMiB``: ``--disk-size 8G``; added in 0.7), else JSON.
    Values are validated strictly by the model, stored with the VM (only what was
    given: defaults stay the model's), handed to every lifecycle hook as
    ``ctx.options`` (the validated model), shown by ``vm show`` and changed by ``vm
    set`` on a stopped VM. Asked once per process per plugin. Added in 0.2.
    """


@hookspec
def exec_options() -> "type[BaseModel] | None":
    """Return the pydantic model of this plugin's per-command options of ``vm exec``
    (e.g. ``auto_prepare: bool``). Each field becomes a flag of ``vm exec`` the way a
    ``vm_options`` field does of ``vm create``; the values given are validated strictly
    and handed to ``before_exec`` as ``ctx.exec_options`` (not stored). Every field
    needs a default. Asked once per process per plugin. Added in 0.8.
    """


@hookspec
def register_commands(app: "typer.Typer", vm: "typer.Typer") -> None:
    """Add CLI commands or sub-apps to ``banger``'s typer app, and ``banger vm``
    subcommands to ``vm`` (e.g. ``@vm.command("exec")``).

    Keep imports inside the command functions: this hook runs on every CLI start that
    needs this plugin's commands (the CLI remembers which plugin registered which
    command and, while nothing changes, loads only the plugins a command needs).
    Added in 0.1; ``vm`` in 0.2.
    """


@hookspec
def register_rpc_methods(register: "Callable[..., None]") -> None:
    """Add daemon RPC methods.

    ``register(name, handler, params=Model | None)``: ``name`` must be
    ``<plugin>.<method>``; ``handler`` is ``async def handler(params, call)`` where
    ``params`` is the validated params model and ``call`` the request (op id, logger,
    ``emit(event)`` for progress, ``state``: the daemon's typed ``DaemonState``).
    Return a JSON-able value or pydantic model; raise ``BangerError`` for user errors.
    Added in 0.1; ``call.state`` in 0.2.
    """


@hookspec
def register_services(register: "Callable[[str, object], None]", daemon: "DaemonState") -> None:
    """Offer daemon-side services to other plugins, by capability.

    ``register(capability, service)``: ``capability`` is this plugin's name or one of
    its ``provides``; ``service`` any object, typically implementing a Protocol the
    providing distribution publishes in a small module consumers import for typing
    only. Consumers reach it through the core, never by importing the provider:
    ``ctx.service(capability)`` in lifecycle and reconcile hooks (the capability must
    be in the consumer's ``requires``), ``call.state.service(capability)`` in RPC
    handlers. Called once at daemon start, in dependency order (a provider before
    its consumers), after the RPC methods are registered. Added in 0.2.

    Daemon-lifetime services (added in 0.5): a service may have any of

    - ``start() -> None``: called once, after ``reconcile`` and before the daemon
      accepts requests, providers before consumers (a DNS server binds its socket, a
      pool starts its refill thread). One that raises is reported by ``daemon status``
      (``services.<plugin>.error``) and in the log; the daemon serves on, and its
      ``stop`` is not called.
    - ``stop() -> None``: called once at daemon shutdown, after in-flight requests
      drained, consumers before providers; every service's ``stop`` runs even if
      another's raised. Must not wait long (the daemon bounds its exit).
    - ``status() -> dict``: JSON-able facts ``daemon status`` shows under
      ``services.<plugin>`` (a listener's address, a pool's size). Keep it cheap.

    A service registered under several capabilities is started and stopped once.
    """


@hookspec
def register_migrations(register: "Callable[[int, str, Callable[[sqlite_utils.Database], None]], None]") -> None:
    """Declare this plugin's own tables in banger's SQLite database, as numbered
    migrations: ``register(number, description, fn)``, numbers from 1, never reused or
    edited once shipped (append a new one instead). ``fn(db)`` gets the
    ``sqlite_utils.Database`` and runs once, in a transaction, recorded in the
    ``plugin_migrations`` table under the plugin's name. Tables it creates must be named
    ``<plugin>_...`` (``-`` written ``_``): one creating another name is rolled back and
    the plugin is broken. Applied at daemon start, before ``register_services``, in
    plugin order; ``bangerd --check-migrations`` lists what is pending (core and
    plugins) without applying it. Use the tables from a service or RPC handler through
    ``daemon.store.transaction()`` (the store's lock and one transaction). Added in 0.5.
    """


@hookspec
def register_sources(register: "Callable[[Source], None]", runtime: "Runtime") -> None:
    """Add sources of images and/or kernels (``banger_core.sources.Source``): what
    ``image pull REF``, ``kernel pull REF`` and ``vm create --image REF`` use for a
    ``REF`` a source claims. A source says which refs it claims, the name and revision
    a pull records, and fetches or builds the artifact into the staging dir the core
    gives it; the core holds the per-name pull lock, judges staleness by the revision,
    checks and publishes a rootfs, imports a kernel, and cleans up. Sources are asked in
    plugin order (the built-in ``catalog`` first; a source with ``fallback = True``
    after all others). ``runtime`` (config, paths) is optional to accept. Called at
    daemon start and by ``doctor``. Added in 0.2; kernels, ``runtime`` and the
    ``kind`` argument of every ``Source`` method in 0.3.
    """


@hookspec
def register_guest_payload(register: "Callable[[GuestFile], None]") -> None:
    """Add files every image banger builds carries (``banger_core.sources.GuestFile``:
    an absolute guest path with data and mode, or a symlink). Sources apply the payload
    to a root filesystem tree before making the filesystem (``job.ctx.payload.apply``)
    and record ``payload.id`` in their revision, so an image made with another payload
    is stale. An executable under ``GUEST_BOOT_DIR`` is started at boot by banger's
    minimal inits; an image with systemd needs a unit. Two plugins registering the same
    path, or a path with '..', make the later one broken. Called at daemon start.
    Added in 0.3.
    """


@hookspec
def register_doctor_checks(register: "Callable[[str, CheckFn], None]", doctor: "DoctorContext") -> None:
    """Add checks to ``banger doctor``.

    ``register(name, fn)``; ``fn(settings)`` returns a ``CheckResult`` (or a list).
    An exception in ``fn`` is reported as FAIL for that check. ``doctor`` (a
    ``DoctorContext``: paths, runtime) is optional to accept. Added in 0.1;
    ``doctor`` in 0.2.
    """


# ---------------------------------------------------------------------------------
# Daemon start
# ---------------------------------------------------------------------------------


@hookspec
def reconcile(ctx: "ReconcileContext") -> None:
    """Bring host state back in line with the store at daemon start.

    Runs once per daemon start in dependency order, before requests are served:
    rebuild in-memory tables (DNS records), and remove leftovers of VMs that are no
    longer running. Must be idempotent. Added in 0.1.
    """


# ---------------------------------------------------------------------------------
# VM lifecycle, in order: prepare_host -> configure_machine -> (boot) -> post_boot
#                          ... -> cleanup (reverse order)
# ---------------------------------------------------------------------------------


@hookspec
def prepare_host(ctx: "StageContext") -> None:
    """Create host-side resources for a VM about to boot (TAP, NAT rules, disks).

    Record in ``ctx.teardown`` what ``cleanup`` needs before creating anything.
    If it raises, the VM does not boot and every enabled plugin's ``cleanup`` runs.
    Added in 0.1.
    """


@hookspec
def configure_machine(ctx: "StageContext", machine: "Machine") -> None:
    """Extend the VMM-neutral machine description (drives, NICs, boot args).

    Mutate ``machine`` in place. Runs after every plugin's ``prepare_host``.
    Added in 0.1.
    """


@hookspec
def post_boot(ctx: "StageContext") -> None:
    """Act on a booted guest (health checks, file sync, DNS records). Added in 0.1."""


@hookspec
def vm_resumed(ctx: "StageContext", resumed: "Resumed") -> None:
    """The VM did not boot: it continues from a snapshot (``vm restore``, each fork of
    ``vm fork``, in parallel, a warm ``vm run``/``vm create --warm``) or from its
    suspend image (``vm start`` after ``vm stop --suspend``). Runs in dependency order after the VMM runs again and
    before ``post_boot``; ``prepare_host`` and ``configure_machine`` ran as for a boot.

    ``resumed.new_identity`` is True when this is a new VM continuing another's state
    (``resumed.source_vm``): whatever the plugin gave the source that must be this VM's
    own is redone now (a NIC starts with its link down, then gets its own MAC and
    address; the agent applies the hostname, a new machine-id, a reseeded RNG, the
    host's clock, new SSH host keys). When False the VM resumes itself after a
    suspend: only what the pause made stale (the clock) needs doing. Raising fails the
    start like ``post_boot`` does. Added in 0.4.
    """


@hookspec
def vm_fields(ctx: "FieldsContext", detail: bool) -> "dict[str, object] | None":
    """Fields this plugin shows for a VM: ``vm show`` (``detail=True``: any number)
    and columns of ``vm list`` (``detail=False``: a few short values, e.g. the
    address). Values must be JSON-able; keep it cheap (no guest round trips): it runs
    for every VM on every ``vm list``. An exception shows as this plugin's ``error``
    field. Added in 0.2.
    """


@hookspec
def vm_port_endpoint(ctx: "FieldsContext", listener: "Listener") -> str | None:
    """Where the host reaches a port listening in the running VM, as ``HOST:PORT``
    (e.g. ``NAME.vm:8080`` once DNS exists, ``127.0.0.1:41234`` for a forwarded port),
    or None when this plugin cannot reach it. Asked in dependency order for each
    listener ``vm ports`` shows; the first answer wins, and with none the endpoint is
    ``guest:PORT``. Keep it cheap (no guest round trips). Added in 0.3.
    """


@hookspec
def vm_egress(ctx: "FieldsContext") -> bool | None:
    """True when the VM reaches networks beyond this host through this plugin (NAT on
    a bridge, QEMU's user-mode network); None or False when not. Asked, in dependency
    order until one says True, by ``ExecContext.egress()`` (a plugin about to fetch
    something in the guest asks it first). Keep it cheap: no guest round trips; it may
    be asked before the VM exists (``ctx.teardown`` empty). Added in 0.8.
    """


@hookspec
def before_exec(ctx: "ExecContext") -> None:
    """A command is about to run in a VM: ``vm exec``, and the command of ``vm run``
    (``ctx.run``; its ``argv`` is empty for ``vm run -d``). Called in dependency order
    in a worker thread, on a running VM: a plugin may set ``ctx.request.cwd`` when it is
    None, do work in the guest first (sync files into it), ``ctx.warn`` about something,
    or refuse by raising ``BangerError`` (the command does not run; for ``vm run`` the
    VM is then deleted if it was ``--rm``).

    ``vm run`` also calls it with ``ctx.plan`` True before it makes the VM (``ctx.vm``
    is then what it would make: no row, nothing on the host or in a guest), and ``vm run
    --dry-run`` stops there: a plugin checks what it can (refusing a run that could not
    succeed before any VM exists) and says what it would do with ``ctx.note``. Added in
    0.8.
    """


@hookspec(firstresult=True)
def request_guest_shutdown(ctx: "StageContext") -> bool | None:
    """Ask the guest to ``sync`` and power off by a channel this plugin owns (agent,
    SSH). Return True if asked (the core then waits for the VMM to exit), None to
    pass. Tried in dependency order before ACPI/Ctrl-Alt-Del and SIGKILL; the first
    plugin returning True wins. Added in 0.1.
    """


@hookspec
def cleanup(ctx: "StageContext") -> None:
    """Undo everything ``prepare_host``/``post_boot`` did for the VM.

    Runs in reverse dependency order when a VM stops, fails to start or is deleted,
    and for the leftovers of VMs found dead. Must be idempotent and must not assume
    ``prepare_host`` ran (or finished): rely on ``ctx.teardown``. Every plugin's
    cleanup runs even if another's raised; all errors are reported together.
    Added in 0.1.

    ``ctx.reason`` (a ``banger_core.context.CleanupReason``), added in 0.2, says why:
    ``STOP`` (``vm stop``/``kill``, the stop of ``vm restart``), ``FAILED_START`` (a
    ``vm start``/``restart`` that failed; the VM stays), ``DELETE`` (``vm delete``,
    ``prune``, a failed ``vm create``: the VM is gone; exactly once, after any stop),
    ``RECONCILE`` (the VMM was found gone without banger stopping it: by the monitor,
    the next operation or at daemon start). Only on ``DELETE`` release what should
    outlive a boot (an address lease, a work disk); on the others undo only what
    belongs to the running VMM. On a core older than 0.2 ``getattr(ctx, "reason",
    None)`` is None: undo everything then.
    """


LIFECYCLE_STAGES: tuple[str, ...] = ("prepare_host", "configure_machine", "vm_resumed", "post_boot", "cleanup")
ALL_HOOKS: tuple[str, ...] = (
    "config_model",
    "vm_options",
    "exec_options",
    "register_commands",
    "register_rpc_methods",
    "register_services",
    "register_migrations",
    "register_sources",
    "register_guest_payload",
    "register_doctor_checks",
    "reconcile",
    "prepare_host",
    "configure_machine",
    "post_boot",
    "vm_resumed",
    "vm_fields",
    "vm_port_endpoint",
    "vm_egress",
    "before_exec",
    "request_guest_shutdown",
    "cleanup",
)
