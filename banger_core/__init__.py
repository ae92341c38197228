"""banger core: models, state, daemon/RPC, CLI shell, VM state machine and hookspecs.

The core knows no feature; every capability is a plugin (see docs/plugins.md).
Plugins write ``from banger_core import hookimpl``.

Imports here are lazy so that ``banger --version`` does not pay for pluggy/pydantic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.9.0"

# Bumped when the request/response envelope changes incompatibly. 2: requests carry
# the CLI's fingerprint (a daemon running other code or config refuses them) and may
# switch the connection to binary frames.
PROTOCOL_VERSION = 2

if TYPE_CHECKING:  # pragma: no cover
    from banger_core.hookspecs import hookimpl as hookimpl

_LAZY = {
    "hookimpl": ("banger_core.hookspecs", "hookimpl"),
    "hookspec": ("banger_core.hookspecs", "hookspec"),
    "BangerError": ("banger_core.errors", "BangerError"),
    "ErrorCode": ("banger_core.errors", "ErrorCode"),
    "Input": ("banger_core.models", "Input"),
    "SizeMiB": ("banger_core.models", "SizeMiB"),
    "HostPath": ("banger_core.models", "HostPath"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'banger_core' has no attribute {name!r}") from None
    import importlib

    return getattr(importlib.import_module(module), attr)
