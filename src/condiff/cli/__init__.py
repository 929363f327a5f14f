"""The condiff command line: the edge of the program, where names become objects. Nothing else imports it."""

from condiff.cli.app import app, main

__all__ = ["app", "main"]
