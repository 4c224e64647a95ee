"""GGUF input: convert a ``.gguf`` file once into a safetensors model folder and reuse it.

transformers dequantizes GGUF weights on load (``from_pretrained(folder, gguf_file=name)``), which
is slow; the converted folder (``save_pretrained`` + tokenizer) is cached under a key made from
the file's sha256, so a second run with the same file starts immediately and an edited file is
converted again. The cache is written to a staging folder and renamed into place (atomic).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from deltawise.errors import InputError
from deltawise.io.writer import sha256_file

CACHE_ENV = "DELTAWISE_CACHE"


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "deltawise")
    return Path(root) / "gguf"


def _convert_with_transformers(gguf: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the GGUF's folder may hold other files (a config.json with auto_map): never run code from it
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False)
    # the weights are already dequantized to float32; transformers still marks the model as
    # "quantized with gguf" and refuses save_pretrained, so drop that marker before saving
    model.hf_quantizer = None
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False).save_pretrained(dest)


def resolve_gguf(model: Path, cache_dir: Path | None = None, converter: Callable[[Path, Path], None] | None = None) -> Path:
    """Return ``model`` itself unless it is a ``.gguf`` file; then the cached converted folder.

    ``converter(gguf_file, dest_folder)`` does the conversion (default: transformers' GGUF loader).
    """
    model = Path(model)
    if model.suffix.lower() != ".gguf":
        return model
    if not model.is_file():
        raise InputError(f"GGUF file {model} does not exist")
    key = sha256_file(model)[:32]
    folder = (cache_dir or default_cache_dir()) / key
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (converter or _convert_with_transformers)(model, staging)
        if not (staging / "config.json").is_file():
            raise InputError(f"converting {model} produced no config.json")
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # a concurrent run that finished first is fine
                raise
    except (ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"cannot read GGUF file {model}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
