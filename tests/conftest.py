"""Shared fixtures: tiny random Llama/BERT checkpoints made on the fly (hidden size <= 64)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

# the demo and its real-data helpers live outside the package, in examples/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_llama(path: Path, seed: int = 0, **config_overrides) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(**config_overrides)).save_pretrained(path)
    return path


def perturb(src: Path, dst: Path, seed: int, scale: float = 0.01, keep: float | None = None) -> Path:
    """Copy a checkpoint folder, adding seeded Gaussian noise to every floating tensor; ``keep``: to about that
    share of the entries only (a random mask drawn after the noise)."""
    import shutil

    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    for f in dst.glob("*.safetensors"):
        state = load_file(f)
        for k, v in state.items():
            if v.is_floating_point():
                noise = scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                state[k] = v + (noise if keep is None else noise * (torch.rand(v.shape, generator=gen) < keep))
        save_file(state, f, metadata={"format": "pt"})
    return dst


def noisy_family(root: Path, count: int, side: int) -> dict[str, Path]:
    """``base`` (``count`` float32 tensors ``model.layers.{i}.w`` of side x side, seed 0) and ``ft1``/``ft2`` (base +
    0.01 / 0.02 Gaussian noise), one-file model folders under root."""
    gen = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.w": torch.randn(side, side, generator=gen) for i in range(count)}
    paths = {}
    for name, scale in (("base", 0.0), ("ft1", 0.01), ("ft2", 0.02)):
        (root / name).mkdir()
        state = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        save_file(state, root / name / "model.safetensors", metadata={"format": "pt"})
        paths[name] = root / name
    return paths


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder: proves an input was not modified."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three fine-tuned variants (base + noise). Treat as read-only."""
    root = tmp_path_factory.mktemp("llama")
    base = save_llama(root / "base")
    family = {"base": base}
    for i in (1, 2, 3):
        family[f"ft{i}"] = perturb(base, root / f"ft{i}", seed=i)
    return family


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory) -> dict[str, Path]:
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                     max_position_embeddings=64)
    BertModel(cfg).save_pretrained(root / "base")
    return {"base": root / "base", "ft1": perturb(root / "base", root / "ft1", 1), "ft2": perturb(root / "base", root / "ft2", 2)}


@pytest.fixture
def make_folder(tmp_path) -> Callable[..., Path]:
    """Write a dict of tensors as a one-file safetensors model folder."""

    def make(name: str, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
        import json

        folder = tmp_path / name
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        return folder

    return make


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs for one test module (the module skips without Ray)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
