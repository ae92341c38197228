"""The banger CLI (typer). ``entry.main`` is the console script."""
