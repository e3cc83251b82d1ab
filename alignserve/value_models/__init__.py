"""alignserve.value_models."""
