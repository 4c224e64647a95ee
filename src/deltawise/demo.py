"""The demo behind the README's first command.

For now (foundation stage) it makes a tiny random Llama base and two "experts" whose deltas
are low-rank (as LoRA fine-tunes are), merges them with every method through the same engine
and CLI code users run, reloads each merged model with transformers, and prints how much of
each expert's task vector every merge kept. The real-model demo (SmolLM2, German text,
forgetting table, HTML report) replaces this as the adaptation and audit features land.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table

from deltawise.merge import merge

DEMO_RECIPES = {
    "linear": {},
    "task_arithmetic": {"weight": 1.0},
    "ties": {"density": 0.2},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.3, "gamma": 0.01},
    "model_stock": {},
    "slerp": {"t": 0.5},
}


def make_models(root: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for expert in ("expert_a", "expert_b"):
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:  # a rank-4 update per matrix, like a merged LoRA
                    p.add_(0.02 * torch.randn(p.shape[0], 4) @ torch.randn(4, p.shape[1]) / 2)
        paths[expert] = root / expert
        model.save_pretrained(paths[expert])
    return paths


def task_vector(model, base) -> torch.Tensor:
    return torch.cat([(p - q).reshape(-1) for p, q in zip(model.parameters(), base.parameters())]).detach()


def run_demo(workdir: Optional[Path], console: Console) -> None:
    from transformers import AutoModelForCausalLM

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="deltawise-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]deltawise demo[/] (foundation stage): tiny Llama, two low-rank experts, {len(DEMO_RECIPES)} merge methods")
    paths = make_models(root)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p).eval()  # noqa: E731
    base = load(paths["base"])
    taus = {e: task_vector(load(paths[e]), base) for e in ("expert_a", "expert_b")}
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))

    table = Table(title="merging expert_a + expert_b")
    for col in ("method", "seconds", "MB written", "kept of A (cos)", "kept of B (cos)", "|merged tau| / |A|", "loads + runs"):
        table.add_column(col, justify="right" if col != "method" else "left", no_wrap=col == "method")
    for method, params in DEMO_RECIPES.items():
        models = ["expert_b"] if method == "slerp" else ["expert_a", "expert_b"]
        recipe = {"merge_method": method, "models": [{"model": str(paths[m])} for m in models]}
        if method == "slerp":
            recipe["parameters"] = params
            recipe["base_model"] = str(paths["expert_a"])
        else:
            recipe["models"] = [dict(m, parameters=params) for m in recipe["models"]]
            if method != "linear":
                recipe["base_model"] = str(paths["base"])
        started = time.time()
        result = merge(recipe, str(root / f"merged_{method}"), overwrite=True)
        merged = load(result.out)
        with torch.no_grad():
            ok = bool(torch.isfinite(merged(ids).logits).all())
        tau = task_vector(merged, base)
        cos = {e: float(torch.nn.functional.cosine_similarity(tau, t, dim=0)) for e, t in taus.items()}
        table.add_row(method, f"{time.time() - started:.2f}", f"{result.bytes_written / 1e6:.1f}",
                      f"{cos['expert_a']:.3f}", f"{cos['expert_b']:.3f}", f"{float(tau.norm() / taus['expert_a'].norm()):.2f}",
                      "yes" if ok else "NO")
    console.print(table)
    console.print(f"models and merges are in {root}")
    console.print("Each merged folder has a model card (README.md) and deltawise_merge.json with the recipe and input fingerprints.")
