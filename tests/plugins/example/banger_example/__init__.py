"""Example third-party plugin: records every lifecycle hook call, adds a command and RPC."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Literal

import typer
from pydantic import BaseModel, ConfigDict, Field

from banger_core import hookimpl
from banger_core.context import CheckResult

# Runs after dns (and so after network, which dns requires).
requires = ["dns"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    greeting: str = "hello"
    times: int = Field(default=1, ge=1, le=10)
    record: str | None = Field(default=None, description="append hook calls as JSON lines here")
    fail_in: Literal["prepare_host", "configure_machine", "post_boot", "cleanup"] | None = Field(
        default=None, description="raise in this lifecycle hook (tests of failure paths)"
    )


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


@hookimpl
def register_commands(app: typer.Typer) -> None:
    sub = typer.Typer(help="Example plugin commands.", no_args_is_help=True)

    @sub.command()
    def greet(name: str, project: Path = typer.Option(None, help="a project dir with banger.toml")) -> None:
        """Greet NAME through the daemon, using settings from config (and PROJECT)."""
        from banger_core.client import Client

        result = Client().call("example.greet", {"name": name, "project": str(project) if project else None})
        typer.echo(result["text"])

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
        return {"text": " ".join([f"{s.greeting}, {params.name}!"] * s.times), "op_id": call.op_id}

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

    register("example.greet", greet, params=GreetParams)
    register("example.wait", wait, params=WaitParams)
    register("example.stuck", stuck, params=StuckParams)


@hookimpl
def register_doctor_checks(register) -> None:
    register(
        "greeting", lambda s: CheckResult.ok("greeting", s.greeting) if s.greeting else CheckResult.fail("greeting", "empty")
    )


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
    _record(ctx.settings, {"hook": "configure_machine", "vm": ctx.vm.name})
    _maybe_fail(ctx.settings, "configure_machine")


@hookimpl
def post_boot(ctx) -> None:
    _record(ctx.settings, {"hook": "post_boot", "vm": ctx.vm.name})
    _maybe_fail(ctx.settings, "post_boot")


@hookimpl
def request_guest_shutdown(ctx) -> None:
    _record(ctx.settings, {"hook": "request_guest_shutdown", "vm": ctx.vm.name})
    return None  # pass: let the core use ACPI


@hookimpl
def cleanup(ctx) -> None:
    _record(ctx.settings, {"hook": "cleanup", "vm": ctx.vm.name, "teardown": ctx.teardown.get("example")})
    _maybe_fail(ctx.settings, "cleanup")
