"""Daemon-lifetime services and plugins' own tables, through the real daemon and CLI.

The example plugin's "greeter" service starts after reconcile, shows in ``daemon
status``, keeps its greetings in its own table (numbered migrations of its own) and
stops at daemon shutdown; ``bangerd --check-migrations`` reports what is pending.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest

from conftest import BIN, make_dist


@pytest.fixture
def xenv(example_env):
    return example_env


def status(env) -> dict:
    return json.loads(env.run("daemon", "status", "--json", check=True).stdout)


def check_migrations(env) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bangerd"), "--check-migrations"], env=env.env(), capture_output=True, text=True, timeout=60)


def greet(env, name: str) -> None:
    env.python(f"from banger_core.client import Client; Client().call('example.greet', {{'name': {name!r}}})")


def test_service_starts_reports_keeps_its_table_and_stops(xenv, tmp_path):
    record = tmp_path / "calls.jsonl"
    xenv.write_config(f"[example]\nrecord = '{record}'\n")

    before = check_migrations(xenv)
    assert before.returncode == 1, before.stdout + before.stderr
    assert "core 1: initial" in before.stdout and "(not created yet)" in before.stdout
    assert "example 1: example_greetings: every greeting" in before.stdout
    assert "example 2: example_greetings: index by name" in before.stdout
    assert not list(xenv.state_dir.rglob("*.db"))  # --check-migrations applies nothing, creates nothing

    xenv.run("daemon", "start", check=True)
    st = status(xenv)
    assert st["services"]["example"] == {"greeted": 0, "kept": 0, "started": True}
    greet(xenv, "ada")
    greet(xenv, "bob")
    assert status(xenv)["services"]["example"] == {"greeted": 2, "kept": 2, "started": True}
    human = xenv.run("daemon", "status", check=True).stdout
    assert "service example: greeted 2, kept 2, started True" in human

    after = check_migrations(xenv)
    assert after.returncode == 0 and "no pending migrations" in after.stdout, after.stdout + after.stderr

    xenv.stop_daemon()
    hooks = [json.loads(ln) for ln in record.read_text().splitlines()]
    assert [h["hook"] for h in hooks] == ["reconcile", "service.start", "service.stop"]
    assert hooks[-1]["greeted"] == 2  # stop ran after the requests, on the same service

    # the table outlives the daemon; the migrations ran once
    db = next(xenv.state_dir.rglob("*.db"))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM example_greetings ORDER BY name").fetchall() == [("ada",), ("bob",)]
        rows = conn.execute("SELECT number FROM plugin_migrations WHERE plugin = 'example' ORDER BY number").fetchall()
        assert rows == [(1,), (2,)]
    xenv.run("daemon", "start", check=True)
    assert status(xenv)["services"]["example"] == {"greeted": 0, "kept": 2, "started": True}


BAD_TABLE = """
from banger_core import hookimpl


@hookimpl
def register_migrations(register):
    register(1, "makes a table outside its prefix", lambda db: db["vms_shadow"].create({"id": str}))
"""

BAD_START = """
from banger_core import hookimpl


class Svc:
    def start(self):
        raise OSError("port 53 is taken")

    def stop(self):
        raise AssertionError("stop of a service that never started")

    def status(self):
        return {"listening": False}


@hookimpl
def register_services(register):
    register("badstart", Svc())


@hookimpl
def register_rpc_methods(register):
    async def ping(_p, call):
        return {"pong": True}

    register("badstart.ping", ping)
"""


def test_a_foreign_table_breaks_the_plugin_and_a_failed_start_is_reported(benv, tmp_path):
    make_dist(tmp_path / "d", "banger-badtable", "badtable", BAD_TABLE)
    make_dist(tmp_path / "d", "banger-badstart", "badstart", BAD_START)
    benv.extra_path.append(str(tmp_path / "d"))
    benv.run("daemon", "start", check=True)
    st = status(benv)
    assert "badtable" in st["broken"] and "a plugin's tables must be named badtable_*" in st["broken"]["badtable"]
    assert st["services"]["badstart"] == {"listening": False, "error": "OSError: port 53 is taken"}
    human = benv.run("daemon", "status", check=True).stdout
    assert "service badstart: NOT STARTED: OSError: port 53 is taken (listening False)" in human
    # the daemon serves on, the plugin's methods too; the rolled-back table does not exist
    out = benv.python("from banger_core.client import Client; print(Client().call('badstart.ping')['pong'])").stdout
    assert out.strip() == "True"
    db = next(benv.state_dir.rglob("*.db"))
    with sqlite3.connect(db) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "vms_shadow" not in names
    benv.stop_daemon()
    log = (benv.state_dir / "bangerd.log").read_text() if (benv.state_dir / "bangerd.log").exists() else ""
    assert "stop of a service that never started" not in log
