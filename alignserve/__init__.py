"""alignserve: an inference server for decoding-time alignment of language models."""

__version__ = "0.1.0"
