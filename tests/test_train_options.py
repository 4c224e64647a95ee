"""``train``'s trainer options: device and compute dtype (with refusals), gradient checkpointing,
evaluation during training (loss checked against a hand computation), refused data formats, and what
the command prints (quiet means quiet; progress lines instead of tqdm)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapt_util import tiny_lm, train_cfg  # noqa: F401
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from deltawise.adapt import run_train
from deltawise.adapt.runtime import compute_arguments
from deltawise.cli import app
from deltawise.errors import InputError

LORA = {"rank": 2}


def _cli(tiny_lm, out: Path, *args: str, quiet: bool = True):  # noqa: F811
    base = ["train", str(tiny_lm["model"]), "--data", str(tiny_lm["data"]), "-o", str(out), "-p", "rank=2",
            "--batch-size", "4"]
    return CliRunner().invoke(app, base + list(args) + (["-q"] if quiet else []))


# --- device and dtype ----------------------------------------------------------------------------

@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown --device 'tpu'"),
    ("cuda:x", "unknown --device 'cuda:x'"),
    pytest.param("cuda", "no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
    pytest.param("cuda:1", "no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
])
def test_a_device_that_is_not_there_is_refused_before_anything_is_written(tiny_lm, tmp_path, device, message):  # noqa: F811
    res = _cli(tiny_lm, tmp_path / "out", "--device", device, "--max-steps", "1")
    assert res.exit_code != 0 and message in str(res.exception), res.output
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="float16 is allowed with a GPU")
def test_float16_on_the_cpu_is_refused_with_the_alternative(tiny_lm, tmp_path):  # noqa: F811
    res = _cli(tiny_lm, tmp_path / "out", "--dtype", "float16", "--device", "cpu", "--max-steps", "1")
    assert res.exit_code != 0 and "float16 needs a GPU" in str(res.exception) and "bfloat16" in str(res.exception)
    with pytest.raises(InputError, match="unknown --dtype 'fp8'"):
        compute_arguments("cpu", "fp8", False)


def test_compute_arguments_map_onto_trainer_settings():
    cpu = compute_arguments("cpu", "bfloat16", True)
    assert (cpu["use_cpu"], cpu["bf16"], cpu["fp16"], cpu["activation_checkpointing"], cpu["dataloader_pin_memory"]) == (
        True, True, False, True, False)
    assert compute_arguments("auto", "float32", False)["use_cpu"] == (not torch.accelerator.is_available())


class _Spy(TrainerCallback):
    """Records, during training, the dtype a linear layer computes in and whether checkpointing is on."""

    def __init__(self):
        self.dtypes: set[torch.dtype] = set()
        self.checkpointing: list[bool] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.checkpointing.append(any(getattr(m, "gradient_checkpointing", False) for m in model.modules()))
        proj = next(m for n, m in model.named_modules() if n.endswith("mlp.down_proj"))
        proj.register_forward_hook(lambda mod, inp, out: self.dtypes.add(out.dtype))


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_weights(tiny_lm, tmp_path):  # noqa: F811
    runs = {}
    for dtype in ("float32", "bfloat16"):
        spy = _Spy()
        result = run_train(train_cfg(tiny_lm, tmp_path / dtype, "lora", LORA, dtype=dtype, device="cpu", lr=1e-2),
                           callbacks=[spy])
        runs[dtype] = (spy.dtypes, result.log, load_file(tmp_path / dtype / "adapter_model.safetensors"))
    assert runs["float32"][0] == {torch.float32} and runs["bfloat16"][0] == {torch.bfloat16}
    assert {v.dtype for v in runs["bfloat16"][2].values()} == {torch.float32}
    # same start, lower-precision arithmetic: close losses, not identical weights
    assert runs["bfloat16"][1][0]["loss"] == pytest.approx(runs["float32"][1][0]["loss"], rel=2e-2)
    assert any(not torch.equal(runs["float32"][2][k], v) for k, v in runs["bfloat16"][2].items())


@pytest.mark.parametrize("method, params", [("lora", LORA), ("sorsa", {"rank": 2}), ("full", {})])
def test_gradient_checkpointing_is_on_and_changes_no_result(tiny_lm, tmp_path, method, params):  # noqa: F811
    weights, flags = [], []
    for checkpointing in (False, True):
        spy = _Spy()
        out = tmp_path / f"gc-{checkpointing}"
        run_train(train_cfg(tiny_lm, out, method, params, gradient_checkpointing=checkpointing, lr=1e-2), callbacks=[spy])
        flags += spy.checkpointing
        weights.append({k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()})
    assert flags == [False, True]
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-6, msg=k)


# --- evaluation during training ------------------------------------------------------------------

def _token_loss(model, batch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="sum")
    return float(nll) / int((target != -100).sum())


def test_eval_loss_is_the_token_mean_on_the_eval_set_at_every_n_steps(tiny_lm, tmp_path):  # noqa: F811
    from adapt_util import base_model, batch_of
    from peft import PeftModel

    out = tmp_path / "out"
    res = _cli(tiny_lm, out, "--max-steps", "4", "--lr", "1e-2", "--eval-data", str(tiny_lm["jsonl"]), "--eval-every", "2")
    assert res.exit_code == 0, res.output
    log = json.loads((out / "training_log.json").read_text())
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]  # the last step was evaluated: no second evaluation at the end
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    final = PeftModel.from_pretrained(base_model(tiny_lm["model"]), out).eval()
    expected = _token_loss(final, batch_of(tiny_lm, data=tiny_lm["jsonl"]))  # response tokens only, all rows together
    assert evals[-1]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert evals[-1]["eval_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]


def test_without_eval_every_the_final_model_is_evaluated_once(tiny_lm, tmp_path):  # noqa: F811
    result = run_train(train_cfg(tiny_lm, tmp_path / "o", "lora", LORA, eval_data=tiny_lm["data"]))
    assert [(r["step"], "eval_perplexity" in r) for r in result.log if "eval_loss" in r] == [(result.steps, True)]
    with pytest.raises(InputError, match="--eval-every needs --eval-data"):
        run_train(train_cfg(tiny_lm, tmp_path / "p", "lora", LORA, eval_every=2))


def test_classification_eval_reports_accuracy(tiny_lm, tmp_path):  # noqa: F811
    from adapt_util import base_model, batch_of, logits

    out = tmp_path / "cls"
    run_train(train_cfg(tiny_lm, out, "full", {}, task="classification", data=tiny_lm["cls"], eval_data=tiny_lm["cls"],
                        max_steps=2, lr=1e-3))
    record = [r for r in json.loads((out / "training_log.json").read_text()) if "eval_loss" in r][-1]
    batch = batch_of(tiny_lm, "classification", tiny_lm["cls"])
    scores = logits(base_model(out, "classification", 2), batch)
    expected_loss = float(torch.nn.functional.cross_entropy(scores, batch["labels"]))
    assert record["eval_accuracy"] == pytest.approx(float((scores.argmax(-1) == batch["labels"]).float().mean()))
    assert record["eval_loss"] == pytest.approx(expected_loss, rel=1e-4)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "Flat is better.", "label": "neutral"}) + "\n")
    with pytest.raises(InputError, match=r"label\(s\) \['neutral'\] do not occur in --data"):
        run_train(train_cfg(tiny_lm, tmp_path / "x", "full", {}, task="classification", data=tiny_lm["cls"], eval_data=other))


# --- data formats and output ---------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".tsv"])
def test_formats_train_does_not_read_are_refused_like_eval_refuses_them(tiny_lm, tmp_path, suffix):  # noqa: F811
    data = tmp_path / f"x{suffix}"
    data.write_text("text,label\nhello,1\n")
    for option in ("--data", "--eval-data"):
        args = ["--data", str(tiny_lm["data"]), "--eval-data", str(data)] if option == "--eval-data" else ["--data", str(data)]
        res = CliRunner().invoke(app, ["train", str(tiny_lm["model"]), *args, "-o", str(tmp_path / "o"), "-q"])
        assert res.exit_code != 0 and f"unsupported dataset format '{suffix}'" in str(res.exception), res.output
    assert not (tmp_path / "o").exists()


def test_quiet_prints_only_the_result_line(tiny_lm, tmp_path):  # noqa: F811
    """In a fresh process, as a user runs it: nothing from transformers (loading bars, warnings) on stderr."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    res = subprocess.run([sys.executable, "-m", "deltawise", "train", str(tiny_lm["model"]), "--data", str(tiny_lm["data"]),
                          "-o", str(tmp_path / "o"), "-p", "rank=2", "--max-steps", "2", "--eval-data", str(tiny_lm["jsonl"]),
                          "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.stdout.startswith("trained lora") and res.stdout.count("\n") == 1


def test_progress_is_reported_as_lines_not_trainer_dicts(tiny_lm, tmp_path):  # noqa: F811
    res = _cli(tiny_lm, tmp_path / "o", "--max-steps", "2", "--eval-data", str(tiny_lm["jsonl"]), quiet=False)
    assert res.exit_code == 0, res.output
    assert "step 1/2  loss " in res.output and "step 2/2  eval loss " in res.output and "perplexity " in res.output
    assert "{'loss'" not in res.output and "it/s]" not in res.output


def test_report_shows_the_evaluations_of_a_train_output(tiny_lm, tmp_path):  # noqa: F811
    """--eval-data results reach the report: the training table's last evaluation and the loss curves."""
    import re

    out = tmp_path / "out"
    res = _cli(tiny_lm, out, "--max-steps", "4", "--lr", "1e-2", "--eval-data", str(tiny_lm["jsonl"]), "--eval-every", "2")
    assert res.exit_code == 0, res.output
    r = CliRunner().invoke(app, ["report", str(out), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, (r.output, r.exception)
    html = (tmp_path / "r.html").read_text()
    last = [e for e in json.loads((out / "training_log.json").read_text()) if "eval_loss" in e][-1]
    row = re.search(r'<table id="table-training">.*?<tbody><tr>(.*?)</tr>', html, re.S).group(1)
    assert f"perplexity {last['eval_perplexity']:.4g} at step 4" in row
    assert 'id="fig-training"' in html and "Training and evaluation loss" in html
