"""banger's built-in plugins.

The core's own commands, RPC methods and doctor checks are registered through the same
``register_*`` hooks as any plugin's (as pytest's essential and default plugins, tox's
internal plugins and llm's ``default_plugins`` are). They are registered before any
entry point, in this order, and listed by ``banger plugins list``; the essential ones
cannot be disabled.
"""

from __future__ import annotations

#: (plugin name, module), registered in this order before the entry points
BUILTIN: tuple[tuple[str, str], ...] = (
    ("daemon", "banger_core.builtin.daemon"),
    ("vm", "banger_core.builtin.vm"),
    ("snapshot", "banger_core.builtin.snapshot"),
    ("image", "banger_core.builtin.image"),
    ("kernel", "banger_core.builtin.kernel"),
    ("plugins", "banger_core.builtin.plugins"),
    ("doctor", "banger_core.builtin.doctor"),
    ("catalog", "banger_core.builtin.catalog"),
)

#: built-ins banger does not work without: ``disable`` naming one is an error; the
#: others (``catalog``) can be disabled like any plugin
ESSENTIAL: frozenset[str] = frozenset({"daemon", "vm", "snapshot", "image", "kernel", "plugins", "doctor"})

#: top-level CLI command -> the built-in that provides it (the CLI's fast path builds
#: only what a command needs; tests check this matches what the hooks register)
COMMANDS: dict[str, str] = {
    "version": "daemon",
    "daemon": "daemon",
    "vm": "vm",
    "snapshot": "snapshot",
    "image": "image",
    "kernel": "kernel",
    "plugins": "plugins",
    "doctor": "doctor",
}
