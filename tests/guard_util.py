"""Shared by the retention guard's tests (tests/test_train_guard*.py): a tiny Llama that knows 'English', and the
'German' run that makes it forget."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import TrainerControl

from deltawise.adapt import TrainConfig, run_train
from deltawise.adapt.guard import MonitorData, RetentionGuard

EN = "the cat sat on a mat and the dog ran to the park while birds sang in green trees".split()
DE = "der hund lief schnell zum grossen park und die katze schlief auf einer warmen decke".split()


@pytest.fixture(scope="module")
def langs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama trained on 'English' (the base), an English source file and a 'German' training file:
    fine-tuning on German at a high learning rate makes the base forget English within a few steps."""
    from tiny_models import save_tiny_llama

    root = tmp_path_factory.mktemp("guard")
    rng = random.Random(0)
    en = [" ".join(rng.choice(EN) for _ in range(10)) for _ in range(40)]
    de = [" ".join(rng.choice(DE) for _ in range(10)) for _ in range(40)]
    (root / "en.txt").write_text("\n%\n".join(en) + "\n")
    (root / "de.txt").write_text("\n%\n".join(de[:32]) + "\n")
    (root / "de_target.txt").write_text("\n%\n".join(de[32:]) + "\n")
    save_tiny_llama(root / "init", en + de, hidden=32, layers=2, vocab=128)
    run_train(TrainConfig(model=root / "init", data=root / "en.txt", output=root / "base", method="full", max_steps=60,
                          lr=1e-2, schedule="constant", batch_size=8, progress=False))
    return {"root": root, "base": root / "base", "en": root / "en.txt", "de": root / "de.txt",
            "de_target": root / "de_target.txt"}


class StepWeights(TrainerCallback):
    """The model's weights at the end of every optimizer step."""

    def __init__(self):
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


def guard_cfg(langs, out: Path, steps: int = 12, lr: float = 3e-3, **kw) -> TrainConfig:
    """Full fine-tuning on 'German' at a constant rate, 8 examples a step: it forgets 'English' within 12 steps."""
    return TrainConfig(model=langs["base"], data=langs["de"], output=out, method="full", max_steps=steps, lr=lr,
                       schedule="constant", batch_size=8, progress=False, **kw)


def scripted_guard(numbers: list[tuple[float, float]], patience: int, guard: RetentionGuard | None = None,
                   first_step: int = 1) -> tuple[RetentionGuard, list[bool]]:
    """A guard (budget 0.9 on 'src'; or ``guard``, continued) whose checks return the scripted (retention lower bound,
    gain) pairs at steps ``first_step``, ``first_step + 1``, ...; and whether each check stopped training."""
    guard = guard or RetentionGuard(MonitorData([], ["src"], {"src": 0.9}), None, Path("."), stop_early=True, patience=patience)
    script = iter(numbers)
    guard._score = lambda *a, **k: None
    guard._snapshot = lambda model: {}

    def compare(_result, _baseline):
        lower, gain = next(script)
        return {"retention": {"src": lower}, "retention_ci": {"src": None}, "retention_lower": {"src": lower},
                "gain": gain, "gain_ci": None}

    guard.compare = compare
    stops = []
    for step in range(first_step, first_step + len(numbers)):
        control = TrainerControl()
        guard.check(None, step, control)
        stops.append(control.should_training_stop)
    return guard, stops
