"""``train --save-every N --resume``: a run interrupted after a checkpoint and resumed ends with exactly
the weights and log of the uninterrupted run (PEFT LoRA with dropout, and our own SORSA and LIFT, whose
masks move across the interruption), and the refusals around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapt_util import tiny_lm, train_cfg  # noqa: F401
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from ddp_worker import Interrupted, StopAt
from deltawise.adapt import run_train
from deltawise.adapt.checkpoints import (TRAINER_DIR, interrupted_checkpoint, load_method_state, open_run_staging, run_key,
                                        save_method_state)
from deltawise.adapt.methods import MethodError, get_method
from deltawise.cli import app
from deltawise.errors import OutputError
from deltawise.io.output import staging_folder

STEPS, SAVE_EVERY, STOP_AT = 6, 2, 3


def _cfg(tiny_lm, out: Path, method: str, params: dict, **kw):  # noqa: F811
    return train_cfg(tiny_lm, out, method, params, max_steps=STEPS, batch_size=2, save_every=SAVE_EVERY, **kw)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _interrupt(cfg) -> Path:
    with pytest.raises(Interrupted):
        run_train(cfg, callbacks=[StopAt(STOP_AT)])
    staging = staging_folder(cfg.output)
    assert not cfg.output.exists() and (staging / "_trainer" / f"checkpoint-{SAVE_EVERY}").is_dir()
    return staging


@pytest.mark.parametrize("method, params", [
    ("lora", {"rank": 2, "dropout": 0.1}),  # dropout: the RNG state must be restored too
    # EVA's initialisation is computed again on resume: the same batches, the same ranks and A
    ("lora", {"rank": 2, "init": "eva", "eva_rho": 4, "targets": "q_proj,down_proj"}),
    ("sorsa", {"rank": 2}),
    ("lift", {"rank": 2, "filter_rank": 2, "refresh_interval": 2}),  # masks refreshed at steps 2 and 4
])
def test_resumed_run_equals_the_uninterrupted_run_exactly(tiny_lm, tmp_path, method, params):  # noqa: F811
    whole = run_train(_cfg(tiny_lm, tmp_path / "whole", method, params))
    _interrupt(_cfg(tiny_lm, tmp_path / "resumed", method, params))
    resumed = run_train(_cfg(tiny_lm, tmp_path / "resumed", method, params, resume=True))
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.steps == STEPS
    keys = ("step", "loss", "learning_rate", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed.log] == [[r[k] for k in keys] for r in whole.log]  # the log from step 1
    meta = json.loads((tmp_path / "resumed" / "deltawise_train.json").read_text())
    assert meta["resumed_from_step"] == SAVE_EVERY and meta["steps"] == STEPS
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging folder renamed into place


def test_lift_resume_needs_its_masks(tiny_lm, tmp_path):  # noqa: F811
    """Without LIFT's saved masks the resumed run could not match: the checkpoint is refused instead."""
    params = {"rank": 2, "filter_rank": 2, "refresh_interval": 2}
    staging = _interrupt(_cfg(tiny_lm, tmp_path / "o", "lift", params))
    (staging / "_trainer" / f"checkpoint-{SAVE_EVERY}" / "deltawise_method_state.safetensors").unlink()
    with pytest.raises(MethodError, match="no LIFT state"):
        run_train(_cfg(tiny_lm, tmp_path / "o", "lift", params, resume=True))
    assert staging.is_dir()  # the checkpoint is still there


def test_method_state_entries_that_share_memory_are_saved(tmp_path):
    """LIFT's mask and its record of masked entries are one tensor until the first refresh: a checkpoint taken then
    (``--save-every 1`` with a later refresh) is still written, and reads back as it was."""

    class Shared:
        mask = torch.tensor([3, 1, 4])

        def resume_state(self):
            return {"mask/a": self.mask, "seen_index/a": self.mask, "view": self.mask[1:]}

        def load_resume_state(self, model, optimizer, state):
            self.loaded = state

    method = Shared()
    save_method_state(method, tmp_path / "checkpoint-1")
    load_method_state(method, None, None, tmp_path / "checkpoint-1")
    assert {k: v.tolist() for k, v in method.loaded.items()} == {"mask/a": [3, 1, 4], "seen_index/a": [3, 1, 4],
                                                                 "view": [1, 4]}


def test_refusals_around_an_interrupted_run(tiny_lm, tmp_path):  # noqa: F811
    params = {"rank": 2}
    with pytest.raises(OutputError, match="nothing to resume"):
        run_train(_cfg(tiny_lm, tmp_path / "o", "lora", params, resume=True))
    assert interrupted_checkpoint(tmp_path / "o") is None
    staging = _interrupt(_cfg(tiny_lm, tmp_path / "o", "lora", params))
    assert interrupted_checkpoint(tmp_path / "o") == staging / "_trainer" / f"checkpoint-{SAVE_EVERY}"
    with pytest.raises(OutputError, match="pass --resume to continue it"):
        run_train(_cfg(tiny_lm, tmp_path / "o", "lora", params))
    with pytest.raises(OutputError, match=r"differs in: --lr, --method-params"):
        run_train(_cfg(tiny_lm, tmp_path / "o", "lora", {"rank": 4}, lr=1e-3, resume=True))
    assert staging.is_dir()
    # through the command line: the same run continues
    res = CliRunner().invoke(app, ["train", str(tiny_lm["model"]), "--data", str(tiny_lm["data"]), "-o", str(tmp_path / "o"),
                                   "-p", "rank=2", "--max-steps", str(STEPS), "--batch-size", "2", "--lr", "1e-2",
                                   "--save-every", str(SAVE_EVERY), "--resume", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "deltawise_train.json").read_text())["resumed_from_step"] == SAVE_EVERY
    assert not staging.exists() and interrupted_checkpoint(tmp_path / "o") is None


def test_a_failed_run_without_checkpoints_leaves_nothing(tiny_lm, tmp_path):  # noqa: F811
    with pytest.raises(Interrupted):
        run_train(train_cfg(tiny_lm, tmp_path / "o", "lora", {"rank": 2}, max_steps=STEPS, batch_size=2),
                  callbacks=[StopAt(STOP_AT)])
    assert list(tmp_path.iterdir()) == []


def _interrupted(out: Path, key: dict, rng_files: tuple[str, ...]) -> Path:
    """A staging folder holding ``key`` and a checkpoint with the RNG files a launch's processes wrote."""
    staging, _ = open_run_staging(out, key, resume=False)
    checkpoint = staging / TRAINER_DIR / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    for name in ("trainer_state.json", *rng_files):
        (checkpoint / name).write_text("{}")
    return checkpoint


def _refused_launch(then: str, now: str) -> str:
    return rf"differs in: the launch \({then} then, {now} now: resume with the launch the run was started with, {then}\)"


def test_the_process_count_is_in_the_key_only_above_one_process(tiny_lm, tmp_path):  # noqa: F811
    """--batch-size is per process: a run resumed by a launch of another process count is refused, naming both
    launches, and stays. A one-process key has the parts it had before the count was in the key, so a one-process run
    interrupted then resumes; a multi-process one interrupted then is known by its checkpoint's per-process RNG files."""
    cfg = _cfg(tiny_lm, tmp_path / "o", "lora", {"rank": 2})  # --batch-size 2
    values = get_method("lora", {"rank": 2}).values
    one, two = run_key(cfg, values, "fp"), run_key(cfg, values, "fp", processes=2)
    assert set(one) == {"options", "model", "data", "replay"} and run_key(cfg, values, "fp", processes=1) == one
    assert two == {**one, "processes": 2}

    out = tmp_path / "two"
    checkpoint = _interrupted(out, two, ("rng_state_0.pth", "rng_state_1.pth"))
    with pytest.raises(OutputError, match=_refused_launch("2 processes × --batch-size 2", "1 × 2")):
        open_run_staging(out, one, resume=True)
    assert open_run_staging(out, two, resume=True)[1] == checkpoint

    out = tmp_path / "one"
    checkpoint = _interrupted(out, one, ("rng_state.pth",))
    with pytest.raises(OutputError, match=_refused_launch("1 process × --batch-size 2", "2 × 2")):
        open_run_staging(out, two, resume=True)
    assert open_run_staging(out, one, resume=True)[1] == checkpoint

    out = tmp_path / "old_two"  # a 2-process run whose key was written without the count
    checkpoint = _interrupted(out, one, ("rng_state_0.pth", "rng_state_1.pth"))
    with pytest.raises(OutputError, match=_refused_launch("2 processes × --batch-size 2", "1 × 2")):
        open_run_staging(out, one, resume=True)
    assert open_run_staging(out, two, resume=True)[1] == checkpoint
