"""alignserve.server."""
