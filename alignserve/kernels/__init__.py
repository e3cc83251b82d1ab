"""alignserve.kernels."""
