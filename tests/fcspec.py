"""Firecracker's OpenAPI (swagger 2.0) spec as a request validator for tests."""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# Firecracker's own spec, vendored with its version and licence (tests/vendor/firecracker/).
SPEC_PATH = Path(__file__).resolve().parent / "vendor" / "firecracker" / "firecracker.yaml"


@lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text())


def _strict(schema: Any) -> Any:
    """Firecracker rejects unknown fields (serde deny_unknown_fields): make object
    schemas without an explicit additionalProperties strict."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def find_operation(method: str, path: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The spec's path template, operation object and path parameters for a request."""
    for template, ops in spec()["paths"].items():
        regex = "^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
        m = re.match(regex, path)
        if m and method.lower() in ops:
            return template, ops[method.lower()], m.groupdict()
    raise AssertionError(f"{method} {path} is not an operation in firecracker.yaml")


def validate_request(method: str, path: str, body: Any) -> str:
    """Raise if the request does not match the spec; return the operationId."""
    template, op, params = find_operation(method, path)
    body_params = [p for p in op.get("parameters", []) if p.get("in") == "body"]
    if body_params:
        p = body_params[0]
        if body is None:
            if p.get("required"):
                raise AssertionError(f"{method} {template}: body required")
        else:
            schema = {"definitions": _strict(copy.deepcopy(spec()["definitions"])), **_strict(p["schema"])}
            jsonschema.Draft4Validator(schema).validate(body)
    elif body is not None:
        raise AssertionError(f"{method} {template} takes no body")
    for p in op.get("parameters", []):
        if p.get("in") == "path":
            assert p["name"] in params, f"{template}: path parameter {p['name']} missing"
            # body ids must match path ids (Firecracker checks this)
            if isinstance(body, dict) and p["name"] in body:
                assert body[p["name"]] == params[p["name"]], f"{template}: {p['name']} in body != path"
    return op["operationId"]
