"""The example plugin's published interface: what whoever ``requires = ["greeter"]``
gets from ``ctx.service("greeter")``. Consumers import this for typing only::

    if TYPE_CHECKING:
        from banger_example.api import Greeter

    greeter: Greeter = ctx.service("greeter")

Import it under ``TYPE_CHECKING`` only: at run time importing ``banger_example.api``
would import the ``banger_example`` package (the plugin) too, which is exactly what a
consumer must not depend on; the service object comes from the core.
"""

from __future__ import annotations

from typing import Protocol


class Greeter(Protocol):
    def greet(self, name: str) -> str:
        """A greeting for ``name`` in the configured words ([example] greeting, times)."""
        ...

    @property
    def greeted(self) -> int:
        """How many greetings this daemon has made."""
        ...
