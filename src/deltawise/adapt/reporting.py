"""What a training run tells while it runs: step progress and one line per log, through the same
``(stage, done, total)`` and note callbacks as every other deltawise job (the CLI draws them with rich,
``deltawise.commands.console``), instead of Trainer's tqdm bar and printed dicts."""

from __future__ import annotations

from typing import Any, Callable, Optional

Progress = Callable[[str, int, int], None]
Note = Callable[[str], None]

STAGE = "training steps"
# the order and spelling of a log line; anything else Trainer logs (grad_norm, epoch) stays in the JSON log
TRAIN_KEYS = (("loss", "loss", "{:.4f}"), ("learning_rate", "lr", "{:.3g}"), ("tokens_per_s", "tok/s", "{:.0f}"))
EVAL_KEYS = (("eval_loss", "eval loss", "{:.4f}"), ("eval_perplexity", "perplexity", "{:.3f}"),
             ("eval_accuracy", "accuracy", "{:.4f}"))


def log_line(step: int, max_steps: int, logs: dict[str, Any]) -> Optional[str]:
    """``step 10/100  loss 2.3456  lr 0.0002  tok/s 5120`` for a training log, ``... eval loss ...`` for an
    evaluation; None for other logs (Trainer's end-of-training summary)."""
    keys = EVAL_KEYS if "eval_loss" in logs else TRAIN_KEYS if "loss" in logs else ()
    parts = [f"{label} {fmt.format(logs[key])}" for key, label, fmt in keys if isinstance(logs.get(key), (int, float))]
    return f"step {step}/{max_steps}  " + "  ".join(parts) if parts else None


def reporter_callback(progress: Optional[Progress], note: Optional[Note]):
    """A transformers ``TrainerCallback`` that reports steps to ``progress`` and log lines to ``note``."""
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if progress is not None:
                progress(STAGE, state.global_step, state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None:
                progress(STAGE, state.global_step, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            line = log_line(state.global_step, state.max_steps, logs or {})
            if note is not None and line is not None and state.is_world_process_zero:
                note(line)

    return Reporter()
