"""Typer sub-apps of the condiff CLI (``condiff ems ...``, ``condiff dc ...``, ``condiff bench ...``).

Each module defines ``app = typer.Typer(...)``; condiff.cli registers them with ``add_typer``."""
