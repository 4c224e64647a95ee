"""The ``train`` command: data formats, classification, atomic output and refusals, the continual
pre-training schedule and replay mix, and GGUF input caching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from adapt_util import tiny_lm  # noqa: F401
from typer.testing import CliRunner

from deltawise.adapt.data import IGNORE_INDEX, Example, ReplayMixSampler, read_examples, tokenize
from deltawise.adapt.train import load_tokenizer
from deltawise.cli import app


def _cli(*args: str):
    return CliRunner().invoke(app, ["train", *map(str, args), "--quiet"])


def test_text_documents_split_on_percent_lines_or_blank_lines(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("one\nline two\n%\nthree\n%\n\n%\nfour\n")
    assert [e.text for e in read_examples(f)] == ["one\nline two", "three", "four"]
    f.write_text("a b\nc\n\nd\n\n\ne\n")
    assert [e.text for e in read_examples(f)] == ["a b\nc", "d", "e"]


def test_prompt_tokens_are_excluded_from_the_loss(tiny_lm):
    tok = load_tokenizer(tiny_lm["model"])
    row = tokenize([Example(text=" better than ugly.", prompt="Beautiful is")], tok, 64, "causal_lm")[0]
    n_prompt = len(tok("Beautiful is")["input_ids"])
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == tok.eos_token_id and len(row["input_ids"]) > n_prompt + 1


def test_prompt_response_loss_covers_response_tokens_only(tiny_lm):
    """The batch the trainer builds from prompt/response JSONL gives the model's loss as the mean
    next-token cross-entropy over response tokens alone (prompt and padding excluded)."""
    import torch.nn.functional as F
    from adapt_util import base_model, batch_of

    batch = batch_of(tiny_lm, data=tiny_lm["jsonl"])
    model = base_model(tiny_lm["model"])
    with torch.no_grad():
        out = model(**batch)
    logp = F.log_softmax(out.logits[:, :-1].float(), -1)
    target, ids = batch["labels"][:, 1:], batch["input_ids"][:, 1:]
    response = target != IGNORE_INDEX
    nll = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert 0 < response.sum() < batch["attention_mask"][:, 1:].sum()  # some real tokens are prompt tokens
    torch.testing.assert_close(out.loss, nll[response].mean(), atol=1e-5, rtol=1e-5)
    all_tokens = nll[batch["attention_mask"][:, 1:].bool()].mean()
    assert abs(float(all_tokens - out.loss)) > 1e-3


def _epoch(sampler: ReplayMixSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_replay_sampler_fraction_per_batch_and_fresh_replay_rows_each_epoch():
    n_target, n_replay = 30, 50
    s = ReplayMixSampler(n_target, n_replay, batch_size=8, fraction=0.25, seed=7)
    epochs = [_epoch(s, e) for e in range(6)]
    assert len(s) == 40 and all(len(e) == 40 for e in epochs)  # 5 batches: 6 target + 2 replay rows each
    replayed = []
    for order in epochs:
        batches = [order[i : i + 8] for i in range(0, 40, 8)]
        assert all(sum(x >= n_target for x in b) == 2 for b in batches)
        assert sorted(x for x in order if x < n_target) == list(range(n_target))  # every target row once
        replayed.append([x - n_target for x in order if x >= n_target])
    # 10 replay rows an epoch, none repeated until all 50 were used: epochs 0-4 partition the set
    assert sorted(sum(replayed[:5], [])) == list(range(n_replay))
    assert len(set(replayed[5])) == 10
    assert epochs[0] != epochs[1] and set(replayed[0]).isdisjoint(replayed[1])
    again = ReplayMixSampler(n_target, n_replay, batch_size=8, fraction=0.25, seed=7)
    assert [_epoch(again, e) for e in range(6)] == epochs  # the seed reproduces every epoch
    assert _epoch(ReplayMixSampler(n_target, n_replay, 8, 0.25, seed=8), 0) != epochs[0]


def test_replay_is_redrawn_each_epoch_inside_the_trainer(tiny_lm, tmp_path, monkeypatch):
    """Through run_train: the trainer calls the sampler's set_epoch, so epoch 2 replays other rows,
    every batch holds its replay share, and the same seed gives the same batches."""
    import deltawise.adapt.train as train_mod
    from adapt_util import train_cfg

    seen: list[list[tuple[tuple[int, ...], bool]]] = []

    class Recording(train_mod.Collator):
        def __call__(self, rows):
            seen.append([(tuple(r["input_ids"]), r["labels"][0] == IGNORE_INDEX) for r in rows])
            return super().__call__(rows)

    monkeypatch.setattr(train_mod, "Collator", Recording)
    # 8 target docs, batch 4 with 1 replay row: 3 batches an epoch, 3 of the 8 prompt/response rows each
    cfg = dict(method="lora", max_steps=-1, epochs=2, batch_size=4, replay=tiny_lm["jsonl"], replay_fraction=0.25)
    run_train_ = train_mod.run_train
    run_train_(train_cfg(tiny_lm, tmp_path / "a", **cfg))
    first, seen[:] = seen[:], []
    run_train_(train_cfg(tiny_lm, tmp_path / "b", **cfg))
    assert seen == first and len(first) == 6
    assert [sum(is_replay for _, is_replay in b) for b in first] == [1] * 6
    replay_by_epoch = [{ids for b in first[e * 3 : e * 3 + 3] for ids, r in b if r} for e in (0, 1)]
    assert len(replay_by_epoch[0]) == 3 and replay_by_epoch[0].isdisjoint(replay_by_epoch[1])
    targets_by_epoch = [sorted(ids for b in first[e * 3 : e * 3 + 3] for ids, r in b if not r) for e in (0, 1)]
    assert targets_by_epoch[0] == targets_by_epoch[1] and len(targets_by_epoch[0]) == 8


def test_cli_train_causal_lm_writes_adapter_and_log(tiny_lm, tmp_path):
    out = tmp_path / "run"
    res = _cli(tiny_lm["model"], "--data", tiny_lm["jsonl"], "-o", out, "--method", "lora", "--max-steps", "2",
               "--batch-size", "4", "--rank", "2")
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    log = json.loads((out / "training_log.json").read_text())
    assert len(log) == 2 and {"loss", "learning_rate", "tokens_per_s", "peak_rss_mb", "rss_mb"} <= set(log[0])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_cli_refuses_output_equal_to_input_and_non_empty_output(tiny_lm, tmp_path):
    res = _cli(tiny_lm["model"], "--data", tiny_lm["data"], "-o", tiny_lm["model"], "--max-steps", "1")
    assert res.exit_code != 0 and "overlaps the input" in str(res.exception)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    res = _cli(tiny_lm["model"], "--data", tiny_lm["data"], "-o", busy, "--max-steps", "1")
    assert res.exit_code != 0 and "not empty" in str(res.exception)
    assert (busy / "keep.txt").read_text() == "x"


def test_classification_label_names_are_saved_and_evaluated(tiny_lm, tmp_path):
    from deltawise.eval.runner import EvalOptions, evaluate

    out = tmp_path / "full"
    res = _cli(tiny_lm["model"], "--data", tiny_lm["cls"], "-o", out, "--task", "classification", "--method", "full",
               "--max-steps", "1")
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    result = evaluate(str(out), [], [tiny_lm["cls"]], EvalOptions(max_length=32))  # string labels as trained on
    lines = tiny_lm["cls"].read_text().splitlines()
    assert result.datasets[0].metric == "accuracy" and result.datasets[0].n_items == len(lines)


def test_classification_trains_head_and_reloads(tiny_lm, tmp_path):
    from peft import PeftModel

    from adapt_util import base_model, batch_of, logits

    out = tmp_path / "cls"
    res = _cli(tiny_lm["model"], "--data", tiny_lm["cls"], "-o", out, "--task", "classification", "--method", "lora",
               "--max-steps", "2", "--rank", "2", "--lr", "1e-2")
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "deltawise_train.json").read_text())
    assert meta["label2id"] == {"neg": 0, "pos": 1}
    batch = batch_of(tiny_lm, "classification", tiny_lm["cls"])
    model = PeftModel.from_pretrained(base_model(tiny_lm["model"], "classification", 2), out)
    saved = {k for k in __import__("safetensors.torch", fromlist=["load_file"]).load_file(out / "adapter_model.safetensors")}
    assert any("score" in k for k in saved), "the new classification head must be saved"
    assert logits(model, batch).shape == (8, 2)


def test_cpt_schedule_rewarms_then_decays_to_min_ratio(tiny_lm, tmp_path):
    from deltawise.adapt import TrainConfig, run_train

    steps, lr, warm, ratio = 10, 1e-3, 0.2, 0.1
    cfg = TrainConfig(model=tiny_lm["model"], data=tiny_lm["data"], output=tmp_path / "cpt", method="lora", max_steps=steps,
                      batch_size=2, lr=lr, schedule="cpt", warmup=warm, min_lr_ratio=ratio, replay=tiny_lm["jsonl"],
                      replay_fraction=0.5, progress=False, method_params={"rank": 2})
    log = run_train(cfg).log
    w = int(math.ceil(warm * steps))
    for rec in log:
        s = rec["step"] - 1  # the logged rate is the one the step used
        if s < w:
            expected = lr * s / w
        else:
            progress = (s - w) / (steps - w)
            expected = lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert rec["learning_rate"] == pytest.approx(expected, rel=1e-6, abs=1e-12), rec


def test_gguf_input_is_converted_once_and_cached(tmp_path, tiny_lm):
    """Caching logic with an injected converter (a real tiny GGUF is not written here)."""
    import shutil

    from deltawise.io.gguf import resolve_gguf

    calls = []

    def fake_convert(gguf: Path, dest: Path) -> None:
        calls.append(gguf)
        shutil.copytree(tiny_lm["model"], dest)

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF-one")
    cache = tmp_path / "cache"
    first = resolve_gguf(f, cache, fake_convert)
    assert (first / "config.json").is_file() and resolve_gguf(f, cache, fake_convert) == first and len(calls) == 1
    f.write_bytes(b"GGUF-two")  # new content, new key: converted again
    assert resolve_gguf(f, cache, fake_convert) != first and len(calls) == 2
    assert resolve_gguf(tiny_lm["model"], cache, fake_convert) == tiny_lm["model"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_real_tiny_gguf_converts_to_the_same_model_and_trains(tiny_lm, tmp_path, monkeypatch):
    """A float32 Llama GGUF written with the ``gguf`` package: the converted folder gives the same
    logits and token ids as the model it was written from, and ``train`` accepts the .gguf path."""
    from adapt_util import base_model, batch_of, logits, write_llama_gguf
    from transformers import AutoTokenizer

    from deltawise.io.gguf import resolve_gguf

    gguf_file = write_llama_gguf(tiny_lm["model"], tmp_path / "tiny.gguf")
    monkeypatch.setenv("DELTAWISE_CACHE", str(tmp_path / "cache"))
    folder = resolve_gguf(gguf_file)
    batch = batch_of(tiny_lm)
    torch.testing.assert_close(logits(base_model(folder), batch), logits(base_model(tiny_lm["model"]), batch),
                               atol=1e-6, rtol=1e-5)
    text = "Beautiful is better than ugly."
    assert (AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
            == AutoTokenizer.from_pretrained(tiny_lm["model"])(text)["input_ids"])
    res = _cli(gguf_file, "--data", tiny_lm["data"], "-o", tmp_path / "out", "--method", "lora", "--max-steps", "1",
               "--rank", "2")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
