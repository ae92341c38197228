"""``banger vm ...``: VM lifecycle."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer

from banger_core.cli import index, style
from banger_core.cli.common import echo_json, error_line, state
from banger_core.errors import BangerError, ErrorCode

if TYPE_CHECKING:  # pragma: no cover
    from pydantic import BaseModel

app = typer.Typer(help="Create, run and manage VMs.", no_args_is_help=True)


def parse_mib(value: str | None, what: str) -> int | None:
    """'512' (MiB), '512M', '2G', '1GiB' -> MiB (the one size syntax: models.parse_size_mib)."""
    if value is None:
        return None
    from banger_core.checks import parse_size_mib

    try:
        return parse_size_mib(value)
    except ValueError as exc:
        raise BangerError(ErrorCode.BAD_REQUEST, f"{what}: {exc}") from None


def positive(value: int | None, what: str) -> int | None:
    if value is not None and value <= 0:
        raise BangerError(ErrorCode.BAD_REQUEST, f"{what} must be greater than 0, got {value}")
    return value


def check_name(name: str | None, what: str = "VM") -> str | None:
    if name is None:
        return None
    from banger_core.checks import validate_vm_name

    try:
        return validate_vm_name(name, what)
    except ValueError as exc:
        raise BangerError(ErrorCode.BAD_REQUEST, str(exc)) from None


class Progress:
    """Stage lines with elapsed time; downloads as a bar on a terminal, else one line."""

    def __init__(self, quiet: bool) -> None:
        self.t0 = time.monotonic()
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._bar_open = False
        self._announced: set[str] = set()

    def _end_bar(self) -> None:
        if self._bar_open:
            sys.stderr.write("\n")
            self._bar_open = False

    def _download(self, ev: dict[str, Any], elapsed: str) -> None:
        got, total, name = ev["bytes"], ev.get("total"), ev["name"]
        if not self.tty:
            if name not in self._announced:
                self._announced.add(name)
                size = f" ({total / 1e6:.1f} MB)" if total else ""
                style.echo(f"{style.paint(elapsed, 'dim', sys.stderr)} download {name}{size}", err=True)
            return
        if total:
            self._bar(name, got / total, f"{got / 1e6:7.1f}/{total / 1e6:.1f} MB")
        else:
            sys.stderr.write(f"\r  {name} {got / 1e6:7.1f} MB")
            sys.stderr.flush()
            self._bar_open = True

    def _work(self, ev: dict[str, Any]) -> None:
        """A build's progress (a kernel compile): a bar on a terminal; elsewhere the
        build's own step lines say how far it got."""
        if self.tty:
            done, total = ev["done"], ev["total"]
            self._bar(ev["name"], done / total, f"{done}/~{total} {ev.get('unit', '')}".rstrip())

    def _bar(self, name: str, frac: float, detail: str) -> None:
        frac = min(1.0, frac)
        sys.stderr.write(f"\r  {name} [{'#' * int(frac * 30):<30}] {frac * 100:5.1f}% {detail}")
        sys.stderr.flush()
        self._bar_open = True

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.quiet:
            return
        stage = ev.get("stage")
        elapsed = f"[{time.monotonic() - self.t0:6.1f}s]"
        if stage == "download":
            self._download(ev, elapsed)
            return
        if stage == "work":
            self._work(ev)
            return
        self._end_bar()
        if stage == "step":
            style.echo(f"{style.paint(elapsed, 'dim', sys.stderr)}   {ev['msg']}", err=True)
            return
        if (said := plugin_said(ev)) is not None:
            style.echo(f"{style.paint(elapsed, 'dim', sys.stderr)}   {said}", err=True)
            return
        if stage == "spec":
            style.echo(
                f"spec: {ev['vcpus']} vcpu | {ev['memory_mib']} MiB | {ev['root_size_mib']} MiB root"
                f" | image {ev['image']}"
                + (f" | kernel {ev['kernel']}" if ev.get("kernel") else "")
                + f" | {ev['driver']} | {ev['vm']} ({ev['id'][:8]})"
                + (f" | {ev['start']}" if ev.get("start") else ""),
                err=True,
            )
        elif stage == "restore":
            style.echo(f"{style.paint(elapsed, 'dim', sys.stderr)} restore from {ev['from']} (no boot)", err=True)
        elif stage == "pull":
            how = f"from {ev['from']}" if ev.get("from") else "(built on this host; minutes the first time)"
            style.echo(f"{style.paint(elapsed, 'dim', sys.stderr)} pull {ev['kind']} {ev['name']} {how}", err=True)
        else:
            style.echo(f"{style.paint(elapsed, 'dim', sys.stderr)} {stage}", err=True)


def plugin_said(ev: dict[str, Any]) -> str | None:
    """A plugin's line in a command's progress, as shown: a warning (``warn``: the VM or
    the command goes on), or a note (``ExecContext.note``: what it does, or would do)."""
    if ev.get("stage") == "warning":
        return style.paint(f"warning: {ev.get('plugin')}: {ev.get('msg')}", "yellow", sys.stderr)
    if ev.get("stage") == "note":
        return f"{ev.get('plugin')}: {ev.get('msg')}"
    return None


def _call(method: str, params: dict[str, Any], on_event: Any = None) -> Any:
    return state.client().call(method, params, on_event=on_event)


def _fan_out(method: str, refs: list[str], as_json: bool, verb: str, shown: Any = None, **extra: Any) -> None:
    """One request for several refs; a line per ref (``shown(vm)``, default NAME: STATE)."""
    progress = Progress(quiet=as_json)
    res = _call(method, {"refs": refs, **extra}, on_event=progress)["results"]
    if as_json:
        echo_json(res)
    failed = 0
    for r in res:
        if r["ok"]:
            if not as_json:
                style.echo(shown(r["vm"]) if shown else f"{r['vm']['name']}: {r['vm'].get('state', verb)}")
        else:
            failed += 1
            err = BangerError.from_dict(r["error"])
            err.message = f"{r['ref']}: {err.message}"
            style.echo(style.paint(error_line(err), "red", sys.stderr), err=True)
    if failed:
        raise typer.Exit(1)


def _defaults_help() -> dict[str, str]:
    """Each VM default as `vm create --help` shows it: the value this host and config
    resolve to, and where it comes from (config / auto / builtin). Uses the runtime the
    CLI loads anyway (for plugin commands): the config is read once per run."""
    from banger_core.config import shown_vm_defaults

    rt = state.try_runtime()
    if rt is None:
        return {}
    cfg = rt.config.core
    why = {"vcpus": "host cpus/4, 1..4", "memory_mib": "host RAM/8, 256 MiB..8 GiB"}
    out = {}
    for key, (shown, src) in shown_vm_defaults(cfg.vm_defaults).items():
        out[key] = f"default: {shown} ({src}" + (f": {why[key]}" if src == "auto" else "") + ")"
    out["driver"] = f"default: {cfg.vmm.driver} ({'config' if 'driver' in cfg.vmm.model_fields_set else 'builtin'}"
    out["driver"] += ": Firecracker when usable, else QEMU)" if cfg.vmm.driver == "auto" else ")"
    return out


# Resolving the defaults loads the config: only when `vm create`'s help is shown.
_D = _defaults_help() if state.asks_help_for("vm", "create") else {}


@app.command()
def create(
    name: Optional[str] = typer.Option(None, "--name", "-n", help="DNS-label name (default: generated)"),
    image: Optional[str] = typer.Option(None, "--image", "-i", help=f"image name, pulled if missing ({_D.get('image', '')})"),
    kernel: Optional[str] = typer.Option(
        None,
        "--kernel",
        "-k",
        help=f"boot this kernel instead of the image's, e.g. microvm-6.1, pulled if missing ({_D.get('kernel', '')})",
    ),
    vcpu: Optional[int] = typer.Option(None, "--vcpu", help=f"vCPUs ({_D.get('vcpus', '')})"),
    memory: Optional[str] = typer.Option(None, "--memory", "-m", help=f"memory, e.g. 1024 or 2G ({_D.get('memory_mib', '')})"),
    root_size: Optional[str] = typer.Option(
        None, "--root-size", help=f"root filesystem size, e.g. 4G ({_D.get('root_size_mib', '')})"
    ),
    driver: Optional[str] = typer.Option(None, "--driver", help=f"qemu | firecracker ({_D.get('driver', '')})"),
    project: Optional[Path] = typer.Option(None, "--project", "-p", help="project dir whose banger.toml applies"),
    warm: bool = typer.Option(
        False, "--warm", help="restore the matching warm-start template instead of booting (made by this boot if none)"
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Create a VM and boot it, showing each stage."""
    params = create_params(name, image, kernel, vcpu, memory, root_size, driver=driver, project=project)
    if warm:
        params["warm"] = True
    t0 = time.monotonic()
    vm = _call("vm.create", params, on_event=Progress(quiet=as_json))
    if as_json:
        echo_json(vm)
        return
    style.echo(f"{vm['name']} {style.paint(vm['state'], 'green')} (id {vm['id'][:8]})")
    style.echo(style.paint(f"ready in {time.monotonic() - t0:.1f}s", "dim", sys.stderr), err=True)


@app.command()
def start(
    refs: List[str] = typer.Argument(..., help="VM names or ID prefixes"), as_json: bool = typer.Option(False, "--json")
) -> None:
    """Boot stopped VMs."""
    _fan_out("vm.start", refs, as_json, "running")


@app.command()
def stop(
    refs: List[str] = typer.Argument(..., help="VM names or ID prefixes"),
    force: bool = typer.Option(False, "--force", "-f", help="skip the graceful shutdown"),
    suspend: bool = typer.Option(
        False, "--suspend", help="write the guest's memory to disk instead: `vm start` resumes it where it was"
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Shut VMs down: guest sync + poweroff, then ACPI, then SIGKILL after a timeout
    (or, with --suspend, keep their running state on disk for the next start)."""
    _fan_out("vm.stop", refs, as_json, "suspended" if suspend else "stopped", force=force, suspend=suspend)


@app.command()
def restart(refs: List[str] = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Stop (gracefully) and boot again: a real new boot."""
    _fan_out("vm.restart", refs, as_json, "running")


@app.command()
def pause(
    refs: List[str] = typer.Argument(..., help="VM names or ID prefixes"), as_json: bool = typer.Option(False, "--json")
) -> None:
    """Freeze running VMs: their vCPUs stop, memory and devices stay in the VMM (exec
    waits for resume; stop resumes first to shut down gracefully)."""
    _fan_out("vm.pause", refs, as_json, "paused")


@app.command()
def resume(
    refs: List[str] = typer.Argument(..., help="VM names or ID prefixes"), as_json: bool = typer.Option(False, "--json")
) -> None:
    """Let paused VMs run again, where they were."""
    _fan_out("vm.resume", refs, as_json, "running")


@app.command()
def kill(
    refs: List[str] = typer.Argument(...),
    signal: str = typer.Option("KILL", "--signal", "-s", help="signal for the VMM process (KILL, TERM, ...)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Send a signal to VMs' VMM processes (default SIGKILL)."""
    _fan_out("vm.kill", refs, as_json, "stopped", signal=signal)


@app.command()
def delete(
    refs: List[str] = typer.Argument(...),
    force: bool = typer.Option(False, "--force", "-f", help="also delete running VMs (killed first)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Delete VMs and everything they left on the host."""
    _fan_out("vm.delete", refs, as_json, "deleted", force=force)


@app.command()
def prune(
    force: bool = typer.Option(False, "--force", "-f", help="do not ask"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Delete every VM that is stopped (not running, paused or suspended)."""
    if not force:
        if not sys.stdin.isatty():
            raise BangerError(ErrorCode.BAD_REQUEST, "prune deletes every stopped VM: pass --force (no terminal to ask)")
        if not typer.confirm("Delete every stopped VM?"):
            raise typer.Exit(1)
    res = _call("vm.prune", {})
    if as_json:
        echo_json(res)
        return
    for v in res["deleted"]:
        style.echo(f"{v['name']}: deleted")
    if not res["deleted"]:
        style.echo("nothing to prune")


@app.command("set")
def set_(
    refs: List[str] = typer.Argument(..., help="VM names or ID prefixes"),
    vcpu: Optional[int] = typer.Option(None, "--vcpu"),
    memory: Optional[str] = typer.Option(None, "--memory", "-m"),
    root_size: Optional[str] = typer.Option(None, "--root-size"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Change stopped VMs' vCPUs, memory or root filesystem size (it only grows)."""
    params: dict[str, Any] = {
        "vcpus": positive(vcpu, "--vcpu"),
        "memory_mib": parse_mib(memory, "--memory"),
        "root_size_mib": parse_mib(root_size, "--root-size"),
        "options": dict(given_options) or None,
    }
    if all(v is None for v in params.values()):
        raise BangerError(ErrorCode.BAD_REQUEST, "nothing to set: give --vcpu, --memory, --root-size or a plugin's option")

    def line(vm: dict[str, Any]) -> str:
        s = vm["spec"]
        for note in vm.get("notes", []):
            style.echo(style.paint(f"note: {note}", "yellow", sys.stderr), err=True)
        return f"{vm['name']}: vcpu={s['vcpus']} memory={s['memory_mib']}MiB root={s['root_size_mib']}MiB"

    _fan_out("vm.set", refs, as_json, "set", shown=line, **{k: v for k, v in params.items() if v is not None})


def create_params(
    name: str | None,
    image: str | None,
    kernel: str | None,
    vcpu: int | None,
    memory: str | None,
    root_size: str | None,
    driver: str | None = None,
    project: Path | None = None,
) -> dict[str, Any]:
    """The vm.create params of a command line (vm create, a plugin's vm run), checked,
    with the plugin options it was given; what was not given is left out."""
    params = {
        "name": check_name(name),
        "image": image,
        "kernel": kernel,
        "vcpus": positive(vcpu, "--vcpu"),
        "memory_mib": parse_mib(memory, "--memory"),
        "root_size_mib": parse_mib(root_size, "--root-size"),
        "driver": driver,
        "project_dir": str(project.resolve()) if project else None,
        "options": dict(given_options) or None,
    }
    return {k: v for k, v in params.items() if v is not None}


#: the vm subcommands that take plugins' per-VM options (a plugin's own vm subcommand
#: opts in by setting ``__banger_vm_options__ = True`` on its function: `vm run`)
OPTION_COMMANDS = ("create", "set")

#: plugin -> {field: value}: the plugin options given on this command line (filled by
#: the wrapper ``with_plugin_options`` puts around ``vm create`` and ``vm set``)
given_options: dict[str, dict[str, Any]] = {}

#: the same for plugins' ``vm exec`` options (``exec_options``: the commands that opt in
#: with ``__banger_exec_options__ = True``, i.e. the agent's ``vm exec``)
given_exec_options: dict[str, dict[str, Any]] = {}


def with_plugin_options(models: "dict[str, type[BaseModel]]", hook: str = "vm_options") -> list[str]:
    """Give ``vm create``, ``vm set`` (and plugin commands that opt in, like ``vm run``)
    one flag per field of each plugin's ``vm_options`` model: ``--nat/--no-nat`` for a
    bool, ``--name VALUE`` otherwise (``--<plugin>-<name>`` when the flag is taken).
    Unset flags send nothing. With ``hook="exec_options"`` the same for the commands
    that opt in to plugins' ``vm exec`` options, into ``given_exec_options``. Returns
    the names of the commands that take them."""
    names = []
    builtin, into = (OPTION_COMMANDS, given_options) if hook == "vm_options" else ((), given_exec_options)
    for info in app.registered_commands:
        cb = info.callback
        if cb is not None and (index.name_of(info) in builtin or getattr(cb, f"__banger_{hook}__", False)):
            names.append(index.name_of(info))
            if models:
                info.callback = _wrapped(cb, models, into)
    return names


def gives_plugin_flags(argv: list[str], hook: str) -> bool:
    """Whether the command of ``argv`` (``vm CMD ...``) needs plugins' flags of ``hook``
    built: ``vm create``/``set``/``run`` always take per-VM options; a command that opts
    in to ``vm exec`` options, only when the command line asks for help or names a long
    option the command does not declare itself (before ``--``). Otherwise the plugins'
    models (pydantic) stay unloaded: ``vm exec VM -- CMD`` is the common path."""
    import inspect

    if len(argv) < 2 or argv[0] != "vm":
        return False
    for info in app.registered_commands:
        cb = info.callback
        if cb is None or index.name_of(info) != argv[1]:
            continue
        if hook == "vm_options":
            return argv[1] in OPTION_COMMANDS or getattr(cb, "__banger_vm_options__", False)
        if not getattr(cb, f"__banger_{hook}__", False):
            return False
        own = {"--help", "-h"}
        for p in inspect.signature(cb).parameters.values():
            for decl in getattr(p.default, "param_decls", None) or ():
                own.update(decl.split("/"))  # "--tty", "--x/--no-x"
        words = argv[2 : argv.index("--")] if "--" in argv else argv[2:]
        return any(w in ("-h", "--help") or (w.startswith("--") and w.split("=", 1)[0] not in own) for w in words)
    return False


def _wrapped(fn: Any, models: "dict[str, type[BaseModel]]", into: dict[str, dict[str, Any]]) -> Any:
    import functools
    import inspect
    import typing

    sig = inspect.signature(fn, eval_str=True)
    taken = {"--help", "-h"}
    for p in sig.parameters.values():
        taken.update(getattr(p.default, "param_decls", None) or ())
    extra: list[inspect.Parameter] = []
    routes: dict[str, tuple[str, str, bool]] = {}  # parameter -> (plugin, field, JSON-encoded)
    for plugin, model in models.items():
        for field, info in model.model_fields.items():
            flag = field.replace("_", "-")
            if f"--{flag}" in taken:
                flag = f"{plugin}-{flag}"
            taken.add(f"--{flag}")
            helptext = f"{plugin}: {info.description or field} (per-VM plugin option)"
            kind = _unoptional(info.annotation)
            if kind is bool:
                option, annotation, as_json = typer.Option(None, f"--{flag}/--no-{flag}", help=helptext), Optional[bool], False
            elif kind in (int, float, str):
                option, annotation, as_json = typer.Option(None, f"--{flag}", help=helptext), Optional[kind], False
            elif _parses_text(kind):  # the model reads the text ("8G")
                option, annotation, as_json = typer.Option(None, f"--{flag}", help=helptext), Optional[str], False
            elif typing.get_origin(kind) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(kind)):
                choices = "|".join(typing.get_args(kind))  # the model says which (a clear error names them)
                option, annotation, as_json = (
                    typer.Option(None, f"--{flag}", help=f"{helptext} [{choices}]"),
                    Optional[str],
                    False,
                )
            else:  # anything else is given as JSON
                option, annotation, as_json = typer.Option(None, f"--{flag}", help=helptext + ", as JSON"), Optional[str], True
            name = f"plugin_option_{len(routes)}"
            routes[name] = (plugin, field, as_json)
            extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        into.clear()
        for name, (plugin, field, as_json) in routes.items():
            value = kwargs.pop(name, None)
            if value is None:
                continue
            if as_json:
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise BangerError(ErrorCode.BAD_REQUEST, f"{plugin} option {field}: not JSON: {exc}") from None
            into.setdefault(plugin, {})[field] = value
        return fn(**kwargs)

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()]
    wrapper.__signature__ = sig.replace(parameters=[*params, *extra])  # type: ignore[attr-defined]
    return wrapper


def _parses_text(kind: Any) -> bool:
    """A type that reads text itself (an ``Annotated`` one with a ``BeforeValidator``,
    e.g. ``SizeMiB``: "8G"): its flag hands the model the text as given."""
    import typing

    from pydantic import BeforeValidator

    return typing.get_origin(kind) is typing.Annotated and any(isinstance(m, BeforeValidator) for m in kind.__metadata__)


def _age(ts: str) -> str:
    secs = (datetime.now(timezone.utc) - datetime.fromisoformat(ts)).total_seconds()
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= n:
            return f"{int(secs // n)}{unit}"
    return f"{int(secs)}s"


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json")) -> None:
    """List VMs."""
    vms = _call("vm.list", {})["vms"]
    if as_json:
        echo_json(vms)
        return
    if not vms:
        style.echo("no VMs")
        return
    rows = [
        [
            v["name"],
            v["id"][:8],
            v["state"],
            v["image"] or "-",
            str(v["spec"]["vcpus"]),
            f"{v['spec']['memory_mib']}M",
            f"{v['spec']['root_size_mib']}M",
            v["driver"],
            _age(v["created_at"]),
        ]
        for v in vms
    ]
    # plugins' short fields as extra columns (PLUGIN.KEY when two plugins share a key)
    columns = list(dict.fromkeys((p, k) for v in vms for p, fields in v.get("fields", {}).items() for k in fields))
    keys = [k for _p, k in columns]
    headers = [(k if keys.count(k) == 1 else f"{p}.{k}").upper() for p, k in columns]
    for row, v in zip(rows, vms, strict=True):
        for p, k in columns:
            value = v.get("fields", {}).get(p, {}).get(k, "-")
            row.append(value if isinstance(value, str) else json.dumps(value))
    style.echo(style.table(rows, ["NAME", "ID", "STATE", "IMAGE", "VCPU", "MEM", "DISK", "VMM", "AGE", *headers]))


@app.command()
def show(ref: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one VM."""
    vm = _call("vm.show", {"ref": ref})
    if as_json:
        echo_json(vm)
        return
    s = vm["spec"]
    for key, value in [
        ("name", vm["name"]),
        ("id", vm["id"]),
        ("state", vm["state"]),
        ("image", vm["image"]),
        ("kernel", s.get("kernel") or "the image's"),
        ("vmm", vm["driver"]),
        ("vcpu", s["vcpus"]),
        ("memory", f"{s['memory_mib']} MiB"),
        ("root", f"{s['root_size_mib']} MiB ({vm.get('disk_strategy') or '-'})"),
        ("from", f"snapshot {vm.get('base_snapshot_name') or vm['base_snapshot']}" if vm.get("base_snapshot") else "a boot"),
        ("pid", vm.get("pid") or "-"),
        ("console", vm["console_log"]),
        ("created", vm["created_at"]),
        ("error", vm.get("last_error") or "-"),
    ]:
        style.echo(f"{key + ':':9} {value}")
    for plugin, values in sorted(vm.get("options", {}).items()):
        style.echo(f"{'options:':9} {plugin}: " + " ".join(f"{k}={json.dumps(v)}" for k, v in values.items()))
    for plugin, fields in vm.get("fields", {}).items():  # what plugins show (their order)
        for key, value in fields.items():
            style.echo(f"{plugin}.{key}: {value if isinstance(value, str) else json.dumps(value)}")
    m = vm.get("machine")  # what the VMM was last booted with (None: never booted)
    if m:
        drives = ", ".join(f"{d['id']}={d['path']}{' (ro)' if d['read_only'] else ''}" for d in m["drives"])
        nics = ", ".join(f"{n['id']}={n['tap']} {n['mac']}" for n in m["nics"])
        style.echo("last boot:")
        for key, value in [
            ("kernel", m["kernel"] + (f" + {m['initrd']}" if m.get("initrd") else "")),
            ("drives", drives or "-"),
            ("nics", nics or "-"),
            ("args", " ".join(m["boot_args"]) or "-"),
        ]:
            style.echo(f"  {key + ':':7} {value}")


@app.command()
def logs(
    ref: str,
    lines: int = typer.Option(200, "--lines", "-n", help="last N lines (0: all)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new output"),
) -> None:
    """Print a VM's serial console output (-f: then follow it until the VM stops)."""
    if not follow:
        res = _call("vm.logs", {"ref": ref, "lines": lines})
        if res["text"]:
            style.echo(res["text"])
        return
    sys.stdout.flush()
    with state.client().open_stream("vm.follow", {"ref": ref, "lines": lines}) as stream:
        try:
            stream.pump(None, sys.stdout.fileno(), sys.stderr.fileno())
        except KeyboardInterrupt:
            pass


def _unoptional(annotation: Any) -> Any:
    """``X`` for ``X | None`` / ``Optional[X]``; anything else as it is."""
    import types
    import typing

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation
