"""What every adaptation method provides to the training loop, and the registry of methods by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from deltawise.architecture import Role, architecture_for
from deltawise.errors import DeltawiseError
from deltawise.params import Param, ParamError, resolve_values

if TYPE_CHECKING:
    from deltawise.delta.base import TensorDelta
    from deltawise.io.reader import ModelReader


class MethodError(DeltawiseError):
    """The method cannot be applied with these parameters or to this model."""


class Method:
    """Base class. Subclasses prepare the model (freeze/wrap), may add a loss term, hook the
    optimizer step, bring their own optimizer, and save what they trained.

    Each subclass declares its parameters once in ``params`` (defaults, ranges, help); an instance
    holds their resolved values in ``self.values``. Instances hold per-run state (masks, selections),
    so make a new one per run (see ``get_method``).
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # "peft" (PEFT adapter folder), "delta" (deltawise delta folder) or "full" (model folder)
    summary: ClassVar[str]  # one line: what the method does
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, values: Mapping[str, Any] | None = None):
        """Validate ``values`` (raw text from the command line or typed values) against ``params`` and fill
        the defaults; an unknown name or a bad value raises MethodError."""
        try:
            self.values: dict[str, Any] = resolve_values(self.name, self.params, values)
        except ParamError as exc:
            raise MethodError(str(exc)) from None

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        raise NotImplementedError

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """Extra loss added to the task loss (before backward), or None."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Called after each backward pass, before gradient clipping (e.g. OSF projects its gradients sharded)."""

    def before_optimizer_step(self, model: nn.Module, peak_lr: float) -> None:
        """Called after gradient clipping, just before ``optimizer.step()``."""

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called right after ``optimizer.step()`` on every process (e.g. LIFT writes its masked
        entries back and refreshes its masks)."""

    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float,
                       max_grad_norm: float) -> torch.optim.Optimizer | None:
        """A method-specific optimizer, or None for the trainer's AdamW over trainable parameters."""
        return None

    def resume_state(self) -> dict[str, torch.Tensor]:
        """Per-run state beyond the model's weights and the optimizer that a run continued from a checkpoint
        needs (e.g. LIFT's masks); saved with every checkpoint. Empty: ``prepare`` rebuilds all of it."""
        return {}

    def load_resume_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``resume_state`` saved, once the checkpoint's weights and optimizer are loaded."""

    def initialise(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str | None,
                   note: Callable[[str], None] | None) -> None:
        """Data-driven initialisation of the prepared model, before the first step (LoRA's ``init=eva``):
        ``batches`` (a sized iterable) gives training batches as the trainer collates them, drawn with the run's
        seed; ``device`` is where training runs; ``note`` hears progress lines. Most methods need none."""

    def initialises_from_data(self) -> bool:
        """Whether ``initialise`` reads training batches: their size (processes × --batch-size) then decides the
        initialisation, so it joins the run's key for ``--resume``."""
        return False

    def before_training(self, model: nn.Module, staging: Path) -> None:
        """Hook run once the model is prepared and before the first step (e.g. PiSSA saves its init)."""

    def save(self, model: nn.Module, out: Path, base: ModelReader | None = None) -> None:
        """Write what was trained into the folder ``out``; ``base`` is the model training started from."""
        raise NotImplementedError

    def count_params(self, model: nn.Module) -> tuple[int, int]:
        """(trainable, total) parameter counts of the prepared model."""
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in model.parameters())

    def record(self) -> dict[str, Any]:
        """JSON-able facts about the run worth keeping (selections, mask sizes)."""
        return {}


class DeltaMethod(Method):
    """A method whose output is a deltawise delta folder (docs/deltas.md): ``deltas`` gives each
    changed parameter's change as a ``TensorDelta`` under the base model's parameter name, and a
    new classification head (``self.heads``, set by ``prepare``) is stored whole as a ``full`` entry.
    The folder records the base's identity, so ``deltawise apply``, merge recipes and ``deltawise
    compress`` take it like any other delta."""

    kind = "delta"
    heads: list[str]

    def deltas(self, model: nn.Module) -> dict[str, TensorDelta]:
        raise NotImplementedError

    def save(self, model: nn.Module, out: Path, base: ModelReader | None = None) -> None:
        from deltawise.delta.full import FullDelta
        from deltawise.delta.store import DeltaWriter, base_identity

        params = dict(model.named_parameters())
        deltas = {**self.deltas(model), **{n: FullDelta(params[n].detach().cpu().clone()) for n in self.heads}}
        parameters = {**self.values, **self.record()}  # the resolved values: defaults filled in
        header = {"method": self.name, "parameters": parameters, "base": base_identity(base) if base else {}}
        with DeltaWriter(out, header, [], staged=False) as writer:  # ``out`` is the run's staging folder
            for name, delta in deltas.items():
                # the dtype the base stores (a tensor new to it keeps the float32 it was trained in)
                writer.add(name, delta, base.info(name).dtype if base is not None and name in base else torch.float32)
            writer.finish()


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def default_targets(model: nn.Module) -> list[str]:
    """PEFT's per-architecture LoRA targets (Llama: q_proj, v_proj), so our own adapters and
    PEFT's adapt the same matrices by default."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MAP:
        linears = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)})
        shown = ", ".join(linears[:12]) + (", ..." if len(linears) > 12 else "")
        raise MethodError(f"no default target modules for model type {model_type!r}: name the linear layers to adapt "
                          f"with -p targets=NAME,NAME (this model's linear layers: {shown or 'none found'})")
    return list(MAP[model_type])


def target_linears(model: nn.Module, targets: list[str] | None) -> dict[str, nn.Linear]:
    """The nn.Linear modules whose name ends with one of ``targets`` (never the LM head)."""
    targets = targets or default_targets(model)
    roles = architecture_for(getattr(model, "config", None))
    found = {
        name: mod for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
        and roles.role(f"{name}.weight") != Role.LM_HEAD
    }
    if not found:
        raise MethodError(f"no linear layer matches targets {targets}")
    return found


def head_names(model: nn.Module, task: str) -> list[str]:
    """Parameters of a freshly initialised classification head: trained and saved whole."""
    if task != "classification":
        return []
    roles = architecture_for(getattr(model, "config", None))
    return [n for n, _ in model.named_parameters() if roles.role(n) == Role.CLASSIFIER]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
