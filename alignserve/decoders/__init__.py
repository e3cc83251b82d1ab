"""alignserve.decoders."""
