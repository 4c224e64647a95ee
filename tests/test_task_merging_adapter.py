"""benchmarks/task_merging.py's adapter rows: task arithmetic written as a PEFT LoRA adapter through deltawise's
adapter output, applied to the base body, scored on test and compared with the dense merge.

Tiny random BERT bodies (hidden 32, two layers) stand in for the MiniLM experts, and a scorer with three random
classification heads stands in for the tasks (labels: the first expert's predictions). Checked: at full rank the
row's per-item test scores are the dense merge's (difference 0, interval [0, 0]); the reported SVD error is the
hand-computed SVD tail of the merged deltas, embedding tables included (written as LoRA-embedding factors), and
falls with the rank while the stored LoRA bytes grow, the bytes saved whole being the LayerNorms alone and the file
smaller than with the tables saved whole; the adapter loaded by PEFT gives the body deltawise apply gives; a cached
row is reused only with the same settings (an older row version is recomputed); the paired bootstrap difference on
hand-made items."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import task_merging  # noqa: E402
from minilm_tasks import HEAD, load_body, split_body  # noqa: E402
from task_merging import (ADAPTER_RANKS, adapter_merge, adapter_row_settings, merge_bodies, paired_difference,  # noqa: E402
                          row_name, run_adapter_row, summarize, update_adapter_row)

LAMBDA = 0.6


@dataclass
class TinyScorer:
    """minilm_tasks.Scorer's interface on a tiny BERT: per task a random 3-class head and 48 random inputs."""

    folder: Path
    heads: dict[str, dict[str, torch.Tensor]]
    inputs: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    _models: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    @torch.inference_mode()
    def predict(self, body: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if task not in self._models:
            config = AutoConfig.from_pretrained(self.folder, num_labels=3)
            self._models[task] = AutoModelForSequenceClassification.from_config(config).eval()
        model = self._models[task]
        missing, unexpected = model.load_state_dict({**body, **self.heads[task]}, strict=False)
        assert not unexpected and not [k for k in missing if "position_ids" not in k]
        return model(input_ids=self.inputs[task]).logits.argmax(-1)

    def correct(self, body: dict[str, torch.Tensor], task: str, split: str) -> list[int]:
        assert split == "test"
        return (self.predict(body, task) == self.labels[task]).int().tolist()


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("adapter_rows")
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                     max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(root / "base_full")
    base, _ = split_body(root / "base_full", root / "bodies" / "_base")
    state = load_body(root / "base_full")
    bodies = []
    for i in range(3):  # full "fine-tunes": every tensor moved, as the MiniLM experts' are
        g = torch.Generator().manual_seed(i + 1)
        folder = root / "experts" / f"e{i}"
        folder.mkdir(parents=True)
        save_file({k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()},
                  folder / "model.safetensors")
        shutil.copy(root / "base_full" / "config.json", folder / "config.json")
        bodies.append(split_body(folder, root / "bodies" / f"e{i}")[0])
    g = torch.Generator().manual_seed(9)
    heads = {t: {f"{HEAD}weight": torch.randn(3, 32, generator=g), f"{HEAD}bias": torch.zeros(3)} for t in ("a", "b", "c")}
    scorer = TinyScorer(root / "base_full", heads, {t: torch.randint(0, 100, (48, 8), generator=g) for t in heads})
    scorer.labels = {t: scorer.predict(load_body(bodies[0]), t) for t in heads}
    dense = merge_bodies("task_arithmetic", base, bodies, {"lambda": LAMBDA}, root / "dense")
    return {"root": root, "base": base, "bodies": bodies, "scorer": scorer, "dense": dense,
            "dense_items": {t: scorer.correct(load_body(dense), t, "test") for t in heads}}


def _row(family, rank: int, work: Path) -> dict:
    return run_adapter_row("row", adapter_row_settings(rank, LAMBDA), family["base"], family["bodies"], work,
                           family["scorer"], family["dense_items"])


def test_at_full_rank_the_row_scores_what_the_dense_merge_scores(family, tmp_path):
    r = _row(family, 32, tmp_path)  # 32 = min(shape) of every matrix of the tiny body
    assert r["test_items"] == family["dense_items"]
    # 13 linear matrices and the word, position and token-type tables
    assert r["svd"]["total_relative_error"] < 1e-5 and r["svd"]["svd_matrices"] == 16
    assert r["svd"]["lora_embedding_tables"] == 3
    d = r["vs_task_arithmetic_items"]
    assert (d["difference"], d["low"], d["high"]) == (0.0, 0.0, 0.0)
    assert not (tmp_path / "merged" / "row").exists()  # the adapter and the applied body are not kept
    assert min(r["test"].values()) < 1.0  # the merge is not the first expert: the items tell merges apart


def test_the_reported_error_is_the_svd_tail_and_falls_with_rank(family, tmp_path):
    base = load_body(family["base"])
    merged = {k: LAMBDA * sum(load_body(b)[k] - base[k] for b in family["bodies"]) for k in base}
    matrices = [k for k, v in merged.items() if v.dim() == 2]  # the linear weights and the embedding tables
    tables = [k for k in matrices if "embeddings" in k]
    assert len(tables) == 3
    total = sum(float(v.double().norm()) ** 2 for v in merged.values())
    rows = {}
    for rank in (2, 8, 32):
        rows[rank] = r = _row(family, rank, tmp_path / str(rank))
        svals = {k: torch.linalg.svdvals(merged[k].double()) for k in matrices}
        tail = sum(float((s[rank:] ** 2).sum()) for s in svals.values())
        assert r["svd"]["total_relative_error"] == pytest.approx((tail / total) ** 0.5, rel=1e-4, abs=1e-6)
        worst = max(float((s[rank:] ** 2).sum() / (s ** 2).sum()) ** 0.5 for s in svals.values())
        assert r["svd"]["max_relative_error"] == pytest.approx(worst, rel=1e-4, abs=1e-6)
        # every LoRA factor of rank r: (out + in) * r float32 entries, and a float32 bias per linear module; a table's
        # rank is at most its smaller side (the token-type table has 2 rows)
        assert r["bytes"]["lora"] == sum(4 * (sum(merged[k].shape) * min(rank, *merged[k].shape)
                                              + (0 if k in tables else merged[k].shape[0])) for k in matrices)
    errors = [rows[k]["svd"]["total_relative_error"] for k in (2, 8, 32)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.1
    norms = sum(4 * v.numel() for k, v in base.items() if "LayerNorm" in k)
    assert rows[2]["bytes"]["saved_whole"] == rows[32]["bytes"]["saved_whole"] == norms  # the LayerNorms alone
    from deltawise.merge import merge

    recipe = {"merge_method": "task_arithmetic", "base_model": str(family["base"]), "parameters": {"lambda": LAMBDA},
              "models": [{"model": str(b)} for b in family["bodies"]], "adapter": {"rank": 8, "embeddings": "whole"}}
    merge(recipe, tmp_path / "whole")  # the tables saved whole: the word embedding is most of the file here too
    whole = task_merging.adapter_bytes(tmp_path / "whole", base)
    assert rows[8]["bytes"]["file"] < whole["file"] and whole["saved_whole"] - norms == sum(
        4 * merged[k].numel() for k in tables)
    # of it, not a body tensor: nothing (a BertModel body has no tied LM head to save the embedding under)
    assert rows[2]["bytes"]["saved_whole_not_in_body"] == 0
    assert rows[2]["bytes"]["file"] < rows[8]["bytes"]["file"] < rows[32]["bytes"]["file"]


def test_peft_loads_the_adapter_into_the_body_deltawise_apply_writes(family, tmp_path):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from deltawise.delta.apply import apply_delta

    result = adapter_merge(4, LAMBDA, family["base"], family["bodies"], tmp_path / "adapter")
    assert not result.exact and result.summary()["lora_embedding_tables"] == 3
    apply_delta(str(tmp_path / "adapter"), str(family["base"]), tmp_path / "applied")
    applied = load_body(tmp_path / "applied")
    model = BertForSequenceClassification.from_pretrained(family["root"] / "base_full")
    loaded = PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload().state_dict()
    for k, v in applied.items():
        assert torch.allclose(loaded[k], v, atol=1e-6), k


def test_a_cached_row_is_reused_only_with_the_same_settings(family, tmp_path, monkeypatch):
    calls = []

    def fake(label, settings, base, bodies, work, scorer, reference_items):
        calls.append((label, settings["lambda"], settings["adapter_rank"]))
        return {"method": label, "settings": settings, "params": {"lambda": settings["lambda"]},
                "test": {}, "bytes": {"file": 1}, "svd": {"total_relative_error": 0.0}, "vs_task_arithmetic_items": None}

    monkeypatch.setattr(task_merging, "run_adapter_row", fake)
    ties = {"params": {"lambda": 0.7}, "test": {"a": 0.5}}
    merges = {"task_arithmetic": {"params": {"lambda": 0.4}, "test": {"a": 0.5}, "test_items": {"a": [1, 0]}},
              "ties": dict(ties)}
    label = "task_arithmetic_adapter_r16"
    args = (family["base"], family["bodies"], tmp_path, family["scorer"])
    assert update_adapter_row(label, merges, *args) is True
    assert update_adapter_row(label, merges, *args) is False  # cached, same settings: not recomputed
    assert calls == [(label, 0.4, 16)]
    merges["task_arithmetic"]["params"]["lambda"] = 0.5  # task arithmetic chose another lambda
    assert update_adapter_row(label, merges, *args) is True
    monkeypatch.setattr(task_merging, "ADAPTER_ROW_VERSION", task_merging.ADAPTER_ROW_VERSION + 1)
    assert update_adapter_row(label, merges, *args) is True  # the pipeline changed
    assert calls == [(label, 0.4, 16), (label, 0.5, 16), (label, 0.5, 16)]
    monkeypatch.undo()
    monkeypatch.setattr(task_merging, "run_adapter_row", fake)
    merges[label]["settings"] = {"version": 1, "method": "task_arithmetic", "lambda": 0.5, "adapter_rank": 16}
    assert update_adapter_row(label, merges, *args) is True  # a row of version 1 (embeddings whole) is not reused
    assert merges[label]["settings"]["adapter_embeddings"] == "lora" and task_merging.ADAPTER_ROW_VERSION == 2
    assert merges["ties"] == ties and set(merges) == {"task_arithmetic", "ties", label}
    with pytest.raises(SystemExit, match="needs task_arithmetic"):
        update_adapter_row(label, {}, *args)


def test_the_summary_and_tables_carry_the_adapter_rows(family, tmp_path):
    label = "task_arithmetic_adapter_r16"
    row = _row(family, 16, tmp_path)
    run = {"experts": {t: 1.0 for t in family["dense_items"]}, "heads_only": {t: 0.3 for t in family["dense_items"]},
           "merges": {"task_arithmetic": {"params": {"lambda": LAMBDA}, "test": {t: sum(c) / len(c) for t, c in
                                                                                family["dense_items"].items()}},
                      label: row}}
    summary = summarize({0: run}, ["task_arithmetic", label])
    assert summary["methods"][label]["vs_task_arithmetic"]["mean"] == pytest.approx(
        row["vs_task_arithmetic_items"]["difference"])  # the experts score 1.0 here: normalized = absolute
    assert summary["adapter_rows"][label]["0"]["bytes"] == row["bytes"]
    lines = task_merging.adapter_lines(summary["adapter_rows"])
    assert lines[0][0] == row_name(label) == "task_arithmetic as adapter (rank 16)" and len(lines) == 1
    task_merging.print_tables(summary, {0: run})
    assert set(ADAPTER_RANKS) <= set(summarize({0: {**run, "merges": {**run["merges"], **{k: row for k in ADAPTER_RANKS}}}},
                                               ["task_arithmetic", *ADAPTER_RANKS])["adapter_rows"])


def test_paired_difference_on_hand_made_items():
    reference = {"a": [1, 0, 0, 0], "b": [1, 1, 0, 0, 1, 0]}
    same = paired_difference(reference, reference)
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    better = paired_difference({"a": [1, 1, 0, 0], "b": reference["b"]}, reference)
    assert better["difference"] == pytest.approx(0.125)  # (0.25 + 0) / 2
    assert 0.0 <= better["low"] <= 0.125 <= better["high"] <= 0.5  # one changed item of four, halved
    assert better["level"] == 0.95 and better["replicates"] == 2000
    with pytest.raises(ValueError, match="same test items"):
        paired_difference({"a": [1, 1, 0]}, {"a": [1, 0, 0, 0]})


def test_every_method_gets_its_per_seed_paired_item_interval_against_task_arithmetic():
    ta_items = {"a": [1, 0, 0, 0, 1], "b": [1, 1, 0, 0]}
    ties_items = {"a": [1, 1, 1, 0, 1], "b": [1, 1, 0, 0]}
    run = {"experts": {"a": 1.0, "b": 1.0}, "heads_only": {"a": 0.2, "b": 0.25},
           "merges": {"task_arithmetic": {"test": {t: sum(c) / len(c) for t, c in ta_items.items()}, "test_items": ta_items},
                      "ties": {"test": {t: sum(c) / len(c) for t, c in ties_items.items()}, "test_items": ties_items},
                      "linear": {"test": {"a": 0.2, "b": 0.5}}}}  # an old cache without per-item scores
    summary = summarize({3: run}, ["task_arithmetic", "ties", "linear"])["methods"]
    ties = summary["ties"]["vs_task_arithmetic_items"]["3"]
    assert ties == paired_difference(ties_items, ta_items)
    assert ties["difference"] == pytest.approx(0.2)  # (0.4 + 0) / 2
    assert summary["linear"]["vs_task_arithmetic_items"] == {}
    assert summary["task_arithmetic"]["vs_task_arithmetic_items"] == {}
    task_merging.print_tables({**{"methods": summary}, "sequential_final": {}}, {3: run})
