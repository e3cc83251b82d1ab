"""alignserve.engine."""
