"""Example third-party plugin: records every lifecycle hook call, adds a command and RPC."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Literal

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from banger_core import hookimpl
from banger_core.context import CheckResult

# Runs after dns (and so after network, which dns requires).
requires = ["dns"]
# Offers a "greeter" service to other plugins (register_services; see api.py).
provides = ["greeter"]
# Its settings also take the top-level [[greeting_for]] array of config.toml and banger.toml.
config_keys = ["greeting_for"]


class NamedGreeting(BaseModel):
    """``[[greeting_for]]``: how to greet one name (instead of ``greeting``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    greeting: str = Field(min_length=1)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    greeting_for: list[NamedGreeting] = Field(
        default_factory=list, description="[[greeting_for]]: per-name greetings; a project adds names, never changes the user's"
    )
    greeting: str = "hello"
    times: int = Field(default=1, ge=1, le=10)
    record: str | None = Field(default=None, description="append hook calls as JSON lines here")
    fail_in: Literal["prepare_host", "configure_machine", "vm_resumed", "post_boot", "cleanup"] | None = Field(
        default=None, description="raise in this lifecycle hook (tests of failure paths)"
    )
    cleanup_log: str | None = Field(default=None, description="append '<vm name> <cleanup reason>' lines here")
    port_host: str | None = Field(default=None, description="vm ports: TCP listeners are reached at PORT_HOST:PORT")

    @field_validator("greeting_for", mode="wrap")
    @classmethod
    def _users_names_are_the_users(cls, value, handler, info: ValidationInfo) -> list[NamedGreeting]:
        """A project's banger.toml may greet new names, not change how the user's own
        config greets one (SettingsSource says which items are the project's)."""
        from banger_core.config import SettingsSource

        items: list[NamedGreeting] = handler(value)
        source = SettingsSource.of(info)
        if source is None:
            return items
        users = {g.name for i, g in enumerate(items) if not source.from_project("greeting_for", i)}
        errors = [
            InitErrorDetails(
                type=PydanticCustomError("users_name", "'{name}' is greeted by the user's own config.toml", {"name": g.name}),
                loc=(i, "name"),
                input=g.name,
            )
            for i, g in enumerate(items)
            if source.from_project("greeting_for", i) and g.name in users
        ]
        if errors:
            raise ValidationError.from_exception_data("Settings", errors)
        return items

    def greeting_of(self, name: str) -> str:
        return next((g.greeting for g in reversed(self.greeting_for) if g.name == name), self.greeting)


def _maybe_fail(settings: Settings | None, hook: str) -> None:
    if settings is not None and settings.fail_in == hook:
        raise RuntimeError(f"example: failing in {hook} as configured")


def _record(settings: Settings | None, entry: dict) -> None:
    path = (settings.record if settings else None) or os.environ.get("BANGER_EXAMPLE_RECORD")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


@hookimpl
def config_model() -> type[BaseModel]:
    return Settings


class VMOptions(BaseModel):
    """Per-VM options: `vm create --motto TEXT --loud`, changed with `vm set`."""

    motto: str = Field(default="", description="a motto, added to the guest's kernel command line")
    loud: bool = Field(default=False, description="shout the motto")
    repeat: int = Field(default=1, ge=1, le=3, description="say the motto this many times")


@hookimpl
def vm_options() -> type[BaseModel]:
    return VMOptions


def _motto(options: VMOptions | None) -> str:
    if options is None or not options.motto:
        return ""
    said = "-".join([options.motto.upper() if options.loud else options.motto] * options.repeat)
    return said


@hookimpl
def vm_fields(ctx, detail: bool) -> dict:
    short = {"motto": _motto(ctx.options) or "-"}
    if not detail:
        return short
    out = {**short, "greeting": ctx.settings.greeting, "prepared": ctx.teardown.get("example") == "made"}
    if ctx.settings.greeting_for:  # [[greeting_for]]: the user's and the project's
        out["greeting_for"] = {g.name: g.greeting for g in ctx.settings.greeting_for}
    if getattr(ctx, "service", None) is not None:  # core 0.5+: services from vm_fields too
        out["greeted"] = ctx.service("greeter").greeted
    return out


class ExecOptions(BaseModel):
    """`vm exec --cheer`: the greeting in the command's environment."""

    model_config = ConfigDict(extra="forbid")

    cheer: bool = Field(default=False, description="put the greeting in the command's environment (EXAMPLE_GREETING)")


@hookimpl
def exec_options() -> type[BaseModel]:
    return ExecOptions


@hookimpl
def vm_egress(ctx) -> bool | None:
    """A VM whose motto is "egress" says it reaches beyond this host (for tests)."""
    return True if ctx.options is not None and ctx.options.motto == "egress" else None


@hookimpl
def before_exec(ctx) -> None:
    """Plan: say what it would do (and whether the VM has egress), refuse the motto
    "refuse"; exec: --cheer puts the greeting in the command's environment, and the motto
    "tmp" runs it in /tmp unless a directory was asked for."""
    from banger_core.errors import BangerError, ErrorCode

    motto = ctx.options.motto if ctx.options is not None else ""
    if ctx.plan:
        if motto == "refuse":
            raise BangerError(ErrorCode.BAD_REQUEST, "the motto 'refuse' refuses every run")
        ctx.note(f"would greet {ctx.vm.name} with {ctx.settings.greeting!r} (egress: {ctx.egress()})")
        return
    _record(ctx.settings, {"hook": "before_exec", "vm": ctx.vm.name, "run": ctx.run, "argv": ctx.request.argv})
    if ctx.exec_options is not None and ctx.exec_options.cheer:
        ctx.request.env["EXAMPLE_GREETING"] = ctx.settings.greeting
        ctx.warn("cheering")
    if motto == "tmp" and ctx.request.cwd is None:
        ctx.request.cwd = "/tmp"


@hookimpl
def vm_port_endpoint(ctx, listener) -> str | None:
    host = ctx.settings.port_host
    if not host or listener.proto != "tcp" or listener.address.startswith("127."):
        return None
    return f"{host}:{listener.port}"


class Greeter:
    """The "greeter" service (implements api.Greeter). It reads the user's [example]
    settings when it greets, not when the daemon starts: a settings error is then
    reported to whoever asked, and does not break the plugin for the whole daemon.

    A daemon-lifetime service: ``start``/``stop`` run once per daemon (recorded like
    the hooks), ``status`` shows in ``banger daemon status``; every greeting is kept in
    the plugin's own table ``example_greetings`` (``register_migrations``)."""

    def __init__(self, daemon) -> None:
        self.runtime, self.store, self._greeted = daemon.runtime, daemon.store, 0
        self.started_at: float | None = None

    def _settings(self):
        return self.runtime.config.settings_for(self.runtime.host, "example")

    def start(self) -> None:
        self.started_at = time.time()
        _record(self._settings(), {"hook": "service.start", "pid": os.getpid()})

    def stop(self) -> None:
        _record(self._settings(), {"hook": "service.stop", "pid": os.getpid(), "greeted": self._greeted})

    def status(self) -> dict:
        return {"greeted": self._greeted, "kept": self.kept, "started": self.started_at is not None}

    def greet(self, name: str) -> str:
        s = self._settings()
        self.keep(name)
        return " ".join([f"{s.greeting_of(name)}, {name}!"] * s.times)

    def keep(self, name: str) -> None:
        """Count a greeting and keep it in the plugin's table."""
        self._greeted += 1
        with self.store.transaction() as db:
            db["example_greetings"].insert({"name": name, "at": time.time()})

    @property
    def greeted(self) -> int:
        return self._greeted

    @property
    def kept(self) -> int:
        """Greetings in the plugin's table: every daemon's, since the table was made."""
        with self.store.transaction() as db:
            return db["example_greetings"].count


def _m1_greetings(db) -> None:
    db["example_greetings"].create({"name": str, "at": float})


def _m2_greetings_index(db) -> None:
    db["example_greetings"].create_index(["name"])


@hookimpl
def register_migrations(register) -> None:
    """The plugin's own table, in numbered migrations (applied once, at daemon start)."""
    register(1, "example_greetings: every greeting", _m1_greetings)
    register(2, "example_greetings: index by name", _m2_greetings_index)


class ToySource:
    """A toy image source: `banger image pull toy:NAME` makes the image `toy-NAME`, a
    tiny ext4 whose /etc/toy names it and the revision. The revision is the content of
    the file $BANGER_EXAMPLE_TOY_REVISION_FILE (default "1"); `toy:fail` fails."""

    name = "toy"
    kinds = ("image",)

    def claims(self, kind, ref: str) -> bool:
        return ref.startswith("toy:")

    def artifact_name(self, kind, ref: str, options) -> str:
        return "toy-" + ref.removeprefix("toy:")

    def revision(self, kind, ref: str, ctx) -> str:
        path = os.environ.get("BANGER_EXAMPLE_TOY_REVISION_FILE")
        return Path(path).read_text().strip() if path and Path(path).exists() else "1"

    def available(self, kind, ctx) -> list[dict]:
        return [{"name": "toy:demo", "description": "a toy image (the example plugin)"}]

    def fetch(self, kind, ref: str, job):
        from banger_core.images import ext4_from_tree
        from banger_core.sources import Fetched

        if ref == "toy:fail":
            raise RuntimeError("the toy source cannot make 'fail'")
        job.step(f"making a toy rootfs for {ref}")
        tree = job.staging / "tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "toy").write_text(f"{ref.removeprefix('toy:')} revision {self.revision(kind, ref, job.ctx)}\n")
        job.ctx.payload.apply(tree)  # what plugins put into every image
        job.check_cancelled()
        out = job.staging / "rootfs.ext4"
        ext4_from_tree(tree, out, size_mib=32)
        return Fetched(rootfs=out, kernel_ref=None)


@hookimpl
def register_guest_payload(register) -> None:
    """A file in every image banger builds (the toy source's included)."""
    from banger_core.sources import GuestFile

    register(GuestFile("/etc/banger-example/motd", b"built with the example plugin\n", 0o640))
    register(GuestFile("/etc/banger-example/link", link="motd"))


@hookimpl
def register_sources(register) -> None:
    register(ToySource())


@hookimpl
def register_services(register, daemon) -> None:
    register("greeter", Greeter(daemon))


@hookimpl
def register_commands(app: typer.Typer, vm: typer.Typer) -> None:
    sub = typer.Typer(help="Example plugin commands.", no_args_is_help=True)

    @vm.command("hello")
    def vm_hello(ref: str) -> None:
        """Say hello to a VM (a `banger vm` subcommand a plugin adds)."""
        from banger_core.client import Client

        shown = Client().call("vm.show", {"ref": ref})
        typer.echo(f"hello from the example plugin to {shown['name']} ({shown['state']})")

    @sub.command()
    def greet(name: str, project: Path = typer.Option(None, help="a project dir with banger.toml")) -> None:
        """Greet NAME through the daemon, using settings from config (and PROJECT)."""
        from banger_core.client import Client

        result = Client().call("example.greet", {"name": name, "project": str(project) if project else None})
        typer.echo(result["text"])

    @sub.command()
    def pipe(
        trailer: str = typer.Option("", help="written to stdout after stdin ends"),
        marker: Path = typer.Option(None, help="the daemon writes started/done/cancelled here"),
    ) -> None:
        """Pump stdin through the daemon's example.pipe back to stdout; exit with its status.

        SIGINT, SIGTERM and SIGHUP are forwarded as signal controls (ending the pipe with
        128+N); a window change as a resize when stdout is a terminal."""
        import shutil
        import signal

        from banger_core.client import Client

        params = {"trailer": trailer, "marker": str(marker) if marker else None}
        with Client().open_stream("example.pipe", params) as stream:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, lambda n, _f: stream.signal(signal.Signals(n).name[3:]))
            if os.isatty(1):
                signal.signal(signal.SIGWINCH, lambda _n, _f: stream.resize(*reversed(shutil.get_terminal_size())))
            result = stream.pump(0, 1, 2)
        raise typer.Exit(result["exit_status"])

    app.add_typer(sub, name="example")


class GreetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    project: str | None = None


class WaitParams(BaseModel):
    marker: str


class StuckParams(BaseModel):
    marker: str
    seconds: float = Field(default=3600, gt=0)


@hookimpl
def register_rpc_methods(register) -> None:
    async def greet(params: GreetParams, call) -> dict:
        from banger_core.config import ProjectConfig

        rt = call.runtime
        project = ProjectConfig.load(Path(params.project)) if params.project else None
        s = rt.config.settings_for(rt.host, "example", project)
        call.log.info("greeting %s", params.name)
        call.state.service("greeter").keep(params.name)
        return {"text": " ".join([f"{s.greeting_of(params.name)}, {params.name}!"] * s.times), "op_id": call.op_id}

    async def wait(params: WaitParams, call) -> dict:
        Path(params.marker).write_text("started\n")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            Path(params.marker).write_text(f"cancelled {call.op_id}\n")
            raise
        return {}

    def stuck(params: StuckParams, call) -> dict:
        """Blocking work that ignores cancellation (a plain def runs in a thread)."""
        Path(params.marker).write_text("started\n")
        time.sleep(params.seconds)
        return {}

    async def greeted(_params: None, call) -> dict:
        """How many greetings the daemon's greeter service made (call.state.service)."""
        return {"greeted": call.state.service("greeter").greeted}

    register("example.greeted", greeted)
    register("example.greet", greet, params=GreetParams)
    register("example.wait", wait, params=WaitParams)
    register("example.stuck", stuck, params=StuckParams)
    register("example.pipe", _pipe, params=PipeParams, stream=True)


class PipeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trailer: str = ""  # written to stdout after stdin ends: output goes on after a half-close
    marker: str | None = None  # "started", then "done N" or "cancelled OP_ID"


async def _pipe(params: PipeParams, call) -> dict:
    """A streaming method: stdin comes back on stdout unchanged; each control message
    gets a line on stderr; a signal control ends it with 128+N, the end of stdin with
    0 (after the trailer)."""
    import signal

    from banger_core import protocol
    from banger_core.errors import BangerError, ErrorCode

    stream = call.stream
    if params.marker:
        Path(params.marker).write_text("started\n")
    total = 0
    outcome = None  # the marker's last word; None until the pipe ends normally
    try:
        await call.emit({"pipe": "started"})  # events travel as EVENT frames
        while (frame := await stream.read()) is not None:
            if frame.kind == protocol.DATA and frame.channel == protocol.STDIN:
                total += len(frame.data)
                await stream.write(protocol.STDOUT, frame.data)
            elif frame.kind == protocol.END and frame.channel == protocol.STDIN:
                if params.trailer:
                    await stream.write(protocol.STDOUT, params.trailer.encode())
                await stream.end(protocol.STDOUT)
                await stream.end(protocol.STDERR)
                outcome = f"done {total}"
                return {"exit_status": 0, "bytes": total}
            elif frame.kind == protocol.CONTROL:
                msg = frame.obj
                if msg.get("type") == "resize":
                    await stream.write(protocol.STDERR, f"resize {msg.get('rows')}x{msg.get('cols')}\n".encode())
                elif msg.get("type") == "signal":
                    name = str(msg.get("name"))
                    try:
                        number = signal.Signals[f"SIG{name}"].value
                    except KeyError:
                        raise BangerError(ErrorCode.BAD_REQUEST, f"unknown signal {name[:20]!r}") from None
                    await stream.write(protocol.STDERR, f"signal {name}\n".encode())
                    outcome = f"signalled {name}"
                    return {"exit_status": 128 + number, "bytes": total}
                else:
                    await stream.write(protocol.STDERR, f"ignored control {json.dumps(msg)[:200]}\n".encode())
        return {"exit_status": 1, "bytes": total}  # None: the client has gone (cancellation follows)
    finally:  # cancelled, the client gone (None, a failed write) or a normal end
        if params.marker:
            Path(params.marker).write_text(f"{outcome or 'cancelled ' + call.op_id}\n")


@hookimpl
def register_doctor_checks(register) -> None:
    def greeting(s: Settings) -> CheckResult:
        if not s.greeting:
            return CheckResult.fail("greeting", "empty")
        n = len(s.greeting_for)
        return CheckResult.ok("greeting", s.greeting + (f"; {n} per-name greeting{'s' if n > 1 else ''}" if n else ""))

    register("greeting", greeting)


@hookimpl
def reconcile(ctx) -> None:
    _record(ctx.settings, {"hook": "reconcile", "plugin": ctx.plugin})


@hookimpl
def prepare_host(ctx) -> None:
    ctx.teardown["example"] = "made"
    _record(ctx.settings, {"hook": "prepare_host", "vm": ctx.vm.name, "greeting": ctx.settings.greeting})
    _maybe_fail(ctx.settings, "prepare_host")


@hookimpl
def configure_machine(ctx, machine) -> None:
    machine.boot_args.append(f"example.greeting={ctx.settings.greeting}")
    if _motto(ctx.options):
        machine.boot_args.append(f"example.motto={_motto(ctx.options)}")
    _record(ctx.settings, {"hook": "configure_machine", "vm": ctx.vm.name})
    _maybe_fail(ctx.settings, "configure_machine")


@hookimpl
def post_boot(ctx) -> None:
    _record(ctx.settings, {"hook": "post_boot", "vm": ctx.vm.name})
    _maybe_fail(ctx.settings, "post_boot")


@hookimpl
def vm_resumed(ctx, resumed) -> None:
    """The VM continued from a snapshot: recorded with what the core said about it."""
    _record(
        ctx.settings,
        {
            "hook": "vm_resumed",
            "vm": ctx.vm.name,
            "snapshot": resumed.snapshot,
            "kind": resumed.kind,
            "source_vm": resumed.source_vm,
            "source_vm_id": resumed.source_vm_id,
            "new_identity": resumed.new_identity,
        },
    )
    _maybe_fail(ctx.settings, "vm_resumed")


@hookimpl
def request_guest_shutdown(ctx) -> None:
    _record(ctx.settings, {"hook": "request_guest_shutdown", "vm": ctx.vm.name})
    return None  # pass: let the core use ACPI


@hookimpl
def cleanup(ctx) -> None:
    reason = getattr(ctx, "reason", None)  # why cleanup runs (core 0.2+; None before)
    reason_text = reason.value if reason is not None else "unknown"
    _record(ctx.settings, {"hook": "cleanup", "vm": ctx.vm.name, "teardown": ctx.teardown.get("example"), "reason": reason_text})
    if ctx.settings is not None and ctx.settings.cleanup_log:
        with open(ctx.settings.cleanup_log, "a") as fh:
            fh.write(f"{ctx.vm.name} {reason_text}\n")
    _maybe_fail(ctx.settings, "cleanup")
