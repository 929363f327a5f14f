"""condiff."""
