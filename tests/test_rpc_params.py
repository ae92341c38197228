"""Every RPC method the daemon serves, core and third-party, answers bad params with a
typed error: called with ``{}`` and with a wrong value for each of its params, over the
real socket. A Python exception leaking out of a handler (KeyError, TypeError, OSError…)
shows up as the generic ``operation_failed: <method> failed: <Type>: …`` and fails."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from banger_core.errors import ErrorCode
from banger_core import PROTOCOL_VERSION

KNOWN_CODES = {c.value for c in ErrorCode}
HUGE = "x" * 200_000

#: values of the wrong type for almost any param, and valid-typed strings that have
#: broken handlers before (NUL bytes, lone surrogates, longer than any path)
VALUES: dict[str, Any] = {
    "int as string": "1",
    "bool": True,
    "int": 7,
    "negative int": -1,
    "float": 1.5,
    "null": None,
    "list of strings": ["x"],
    "list of ints": [1, 2],
    "list of lists": [["x"]],
    "nested object": {"a": {"b": {"c": [1, {"d": None}]}}},
    "empty string": "",
    "huge string": HUGE,
    "NUL byte": "a\x00b",
    "lone surrogate": "a\ud800b",
    "dots": "..",
    "slash path": "/",
    "list with a huge string": [HUGE],
    "list with a NUL": ["a\x00b"],
}

#: methods that would do real (slow) work when their params are valid: they only get
#: params that cannot validate. vm.create is also run against a config whose default
#: image does not exist, so a `{}` that validates fails fast (not_found) instead of
#: pulling and building the default image.
INVALID_ONLY = {"example.wait", "example.stuck"}
NEVER = {"daemon.shutdown"}
#: cases covered by their own test below
ELSEWHERE: set[tuple[str, str, str]] = set()


def call(benv, method: str, params: Any, timeout: float = 30) -> dict | None:
    frame = json.dumps({"v": PROTOCOL_VERSION, "method": method, "params": params, "op_id": "op-0123456789ab"}).encode() + b"\n"
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(benv.socket))
    try:
        s.sendall(frame)
        lines = s.makefile("rb")
        while line := lines.readline():
            msg = json.loads(line)
            if "event" not in msg:
                return msg
        return None  # dropped without a final reply
    finally:
        s.close()


def _types(schema: dict, defs: dict) -> set[str]:
    """The JSON types a (sub)schema admits; empty when unconstrained."""
    if "$ref" in schema:
        return _types(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in schema:
        out: set[str] = set()
        for sub in schema["anyOf"]:
            t = _types(sub, defs)
            if not t:
                return set()
            out |= t
        return out
    if "enum" in schema or "const" in schema:
        return {"string"}
    ty = schema.get("type")
    return {ty} if isinstance(ty, str) else set(ty or ())


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _plausible(schema: dict, defs: dict) -> Any:
    """A value of the right type for a required param, so the others get checked too."""
    types = _types(schema, defs)
    for t, v in (("array", ["nope"]), ("string", "nope"), ("integer", 1), ("boolean", False)):
        if t in types:
            return v
    return None


def cases(methods: dict[str, dict]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name, info in sorted(methods.items()):
        if name in NEVER:
            continue
        schema = info["params"] or {}
        defs = schema.get("$defs", {})
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        out.append((name, {}))
        out.append((name, {"no_such_param": 1}))
        base = {} if name in INVALID_ONLY else {p: _plausible(props[p], defs) for p in sorted(required)}
        base = {k: v for k, v in base.items() if v is not None}
        for param in sorted(props):
            admits = _types(props[param], defs)
            for label, value in VALUES.items():
                if name in INVALID_ONLY and (not admits or _json_type(value) in admits):
                    continue
                if (name, param, label) in ELSEWHERE:
                    continue
                out.append((name, {**base, param: value}))
    return out


@pytest.fixture
def pdaemon(benv, example_plugin_dir):
    benv.extra_path.append(str(example_plugin_dir))
    # vm.create with params that validate must fail fast, never pull or build an image.
    benv.write_config('[vm_defaults]\nimage = "no-such-image"\n[vmm]\ndriver = "qemu"\naccel = "tcg"\n')
    benv.run("daemon", "start", check=True)
    return benv


def test_every_method_answers_bad_params_with_a_typed_error(pdaemon):
    status = call(pdaemon, "daemon.status", {})
    assert status and status["ok"], status
    described = call(pdaemon, "daemon.methods", {})
    assert described and described["ok"], described
    methods = described["result"]["methods"]
    assert set(methods) == set(status["result"]["methods"])
    assert {"vm.create", "vm.kill", "example.greet", "example.wait", "daemon.methods"} <= set(methods)
    assert methods["example.greet"]["owner"] == "example" and methods["vm.kill"]["owner"] == "vm"

    problems: list[str] = []
    seen: set[str] = set()
    todo = cases(methods)
    for method, params in todo:
        seen.add(method)
        shown = json.dumps(params)[:160]
        reply = call(pdaemon, method, params)
        if reply is None:
            problems.append(f"{method} {shown}: connection dropped without a reply")
            continue
        errors = [reply["error"]] if reply.get("ok") is False else []
        if reply.get("ok") is True and isinstance(reply["result"], dict):  # per-ref results of vm verbs
            errors += [r["error"] for r in reply["result"].get("results", []) if isinstance(r, dict) and "error" in r]
        if "ok" not in reply:
            problems.append(f"{method} {shown}: not a final reply: {str(reply)[:200]}")
        for err in errors:
            if err.get("code") not in KNOWN_CODES:
                problems.append(f"{method} {shown}: unknown code {err.get('code')!r}")
            elif err["code"] == "operation_failed" and err["message"].startswith(f"{method} failed: "):
                problems.append(f"{method} {shown}: {err['message'][:300]}")
    assert seen == set(methods) - NEVER
    assert not problems, f"{len(problems)} of {len(todo)} calls:\n" + "\n".join(problems)
    # A method without a params model takes no params at all.
    for method in ("vm.list", "image.list", "kernel.list", "daemon.hello", "daemon.status"):
        reply = call(pdaemon, method, {"no_such_param": 1})
        assert reply["error"]["code"] == "bad_request", reply
    assert call(pdaemon, "daemon.hello", {})["ok"]


def test_kill_without_a_signal_uses_the_default(pdaemon):
    """The default (KILL) goes through the validator too: it used to be left as "KILL"
    and the handler looked up signals.Signals["KILL"] (KeyError)."""
    reply = call(pdaemon, "vm.kill", {"refs": ["nope"]})
    assert reply["ok"] is True, reply
    (res,) = reply["result"]["results"]
    assert res["ok"] is False and res["error"]["code"] == "not_found"
    reply = call(pdaemon, "vm.kill", {"refs": ["nope"], "signal": "BOGUS"})
    assert reply["error"]["code"] == "bad_request" and "unknown signal 'BOGUS'" in reply["error"]["message"]


def test_a_project_path_too_long_is_a_typed_error(pdaemon):
    reply = call(pdaemon, "example.greet", {"name": "x", "project": HUGE})
    assert reply["ok"] is False and not reply["error"]["message"].startswith("example.greet failed: "), reply
