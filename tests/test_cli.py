"""The CLI shell: version, help, errors, styling, completion."""

from __future__ import annotations

import ast
import subprocess
import sys

from banger_core import __version__, hookspecs
from conftest import BANGER, REPO


def test_version_fast_path_imports_nothing_heavy(benv):
    r = benv.run("--version", check=True)
    assert r.stdout == f"banger {__version__}\n"
    # The console script's fast path must not import typer/pydantic/pluggy.
    code = (
        "import sys; sys.argv=['banger','--version']; from banger_core.cli.entry import main; main(); "
        "heavy=[m for m in ('typer','pydantic','pluggy','sqlite_utils','click') if m in sys.modules]; "
        "print('heavy:', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.endswith("heavy: []\n")
    assert benv.run("-V", check=True).stdout == f"banger {__version__}\n"
    assert benv.run("daemon", "--help", check=True).returncode == 0


def test_no_args_shows_help_with_core_commands(benv):
    r = benv.run()
    for cmd in ("version", "daemon", "plugins", "doctor"):
        assert cmd in r.stdout
    assert r.returncode in (0, 2)


def test_unknown_command_is_a_usage_error(benv):
    r = benv.run("teleport")
    assert r.returncode == 2 and "No such command 'teleport'" in r.stderr


def test_error_format_on_stderr(benv):
    benv.write_config("[daemon]\nlog_level = 'shout'\n")
    r = benv.run("plugins", "list")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"banger: {benv.config_file}: [daemon] log_level:")


def test_no_color_and_force_color(benv):
    benv.write_config("[daemon]\nlog_level = 'shout'\n")
    plain = benv.run("plugins", "list")
    assert "\x1b[" not in plain.stderr
    forced = benv.run("plugins", "list", NO_COLOR="", FORCE_COLOR="1")
    # NO_COLOR is honoured whenever it is set, even empty, per no-color.org
    assert "\x1b[" not in forced.stderr
    env = benv.env(FORCE_COLOR="1")
    env.pop("NO_COLOR")
    colored = subprocess.run([BANGER, "doctor"], env=env, capture_output=True, text=True)
    assert "\x1b[32mPASS" in colored.stdout


def test_shell_completion_script(benv):
    r = benv.run("--show-completion", "bash", check=True)
    assert "complete" in r.stdout and "banger" in r.stdout


def test_doctor_reports_and_passes_on_installed_host(benv):
    r = benv.run("doctor", check=True)
    assert "0 fail" in r.stdout
    for name in ("python", "config", "plugin order", "state", "daemon", "qemu", "network: tun", "workdisk: tools"):
        assert any(
            line.split(None, 1)[1].startswith(name) for line in r.stdout.splitlines() if line[:4] in ("PASS", "WARN", "FAIL")
        ), name


# --- meta: every hook is documented and exercised ----------------------------------------


def test_every_hookspec_is_documented():
    doc = (REPO / "docs" / "plugins.md").read_text()
    for hook in hookspecs.ALL_HOOKS:
        assert f"### `{hook}`" in doc, f"docs/plugins.md has no section for {hook}"


def test_every_hookspec_is_implemented_by_the_example_plugin():
    # The example plugin is driven end to end by tests/test_third_party.py.
    src = (REPO / "tests" / "plugins" / "example" / "banger_example" / "__init__.py").read_text()
    tree = ast.parse(src)
    impls = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and any(getattr(d, "id", None) == "hookimpl" for d in node.decorator_list)
    }
    assert impls == set(hookspecs.ALL_HOOKS)


def test_all_hooks_lists_every_hookspec():
    specs = {n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "banger_spec")}
    assert specs == set(hookspecs.ALL_HOOKS)


def test_build_progress_is_a_bar_on_a_terminal_and_silent_elsewhere(capsys, monkeypatch):
    from banger_core.cli.vm_cmd import Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    p = Progress(quiet=False)
    p({"stage": "work", "name": "kernel k", "done": 450, "total": 1800, "unit": "steps"})
    p({"stage": "step", "msg": "compiled"})
    err = capsys.readouterr().err
    assert "\r  kernel k [#######                       ]  25.0% 450/~1800 steps\n" in err and "compiled" in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    Progress(quiet=False)({"stage": "work", "name": "kernel k", "done": 450, "total": 1800})
    assert capsys.readouterr().err == ""  # step lines carry the news when not on a terminal


def test_build_progress_reaching_the_client_is_throttled_but_ends_at_the_total():
    from banger_core.pulls import Puller

    events: list[dict] = []
    work = Puller._work(lambda stage, ev: events.append({"stage": stage, **ev}), "kernel k")
    for done in range(1, 1800):
        work(done, 1800)
    work(1800, 1800)
    assert [e["done"] for e in events] == [1, 1800]  # a compile's 1800 steps inside half a second
    assert events[-1] == {"stage": "work", "name": "kernel k", "done": 1800, "total": 1800, "unit": "steps"}
