"""Console-script entry point. Kept tiny: ``banger --version`` must not import typer,
pydantic or pluggy."""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv in (["--version"], ["-V"]):
        from banger_core import __version__

        print(f"banger {__version__}")
        return
    from banger_core.cli.app import run

    run(argv)


if __name__ == "__main__":
    main()
