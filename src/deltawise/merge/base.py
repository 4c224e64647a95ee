"""The merge-method interface and the per-tensor job the engine hands to methods.

A method is a small class registered by name. The engine does all I/O: it resolves the
recipe's parameters for each tensor, reads the inputs (as float32, or float64 if stored so),
and calls ``merge`` once per tensor -- or once per row chunk when ``elementwise`` says the
output entry depends only on the same entry of the inputs. Methods needing whole-model
statistics (global top-k thresholds) yield streaming passes from ``stats_passes``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Literal, Optional

import torch

from deltawise.merge.params import Param

if TYPE_CHECKING:
    from deltawise.merge.plan import MergePlan


@dataclass
class TensorJob:
    """The inputs of one tensor (or row chunk of it) and its resolved parameters."""

    name: str
    base: Optional[torch.Tensor]
    models: list[torch.Tensor]
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    row_start: int = 0  # first row of this chunk within the full tensor

    def deltas(self) -> list[torch.Tensor]:
        """Task vectors tau_i = theta_i - theta_0."""
        if self.base is None:
            raise ValueError(f"{self.name}: this method needs a base model")
        return [m - self.base for m in self.models]

    def weights(self, default: float = 1.0) -> torch.Tensor:
        ref = self.models[0]
        return torch.tensor([p.get("weight", default) for p in self.model_params], dtype=ref.dtype, device=ref.device)

    def generator(self, model_index: int) -> torch.Generator:
        """A random stream that depends only on (seed, tensor, model, chunk): reproducible whatever
        the thread count, device or processing order."""
        key = f"{self.seed}|{self.name}|{model_index}|{self.row_start}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
        device = self.models[0].device
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen


class StatsPass:
    """One streaming pass over every merged tensor, collecting whole-model statistics."""

    label = "collecting statistics"

    def update(self, job: TensorJob) -> None:
        raise NotImplementedError


class MergeMethod:
    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str] = ""
    # "required": tensors are merged relative to base_model; "none": base_model only names the
    # output's tensors/config (merged like any model only if it is also listed under models)
    base_policy: ClassVar[Literal["required", "none"]] = "required"
    min_models: ClassVar[int] = 1  # inputs besides the base
    max_models: ClassVar[Optional[int]] = None
    params: ClassVar[tuple[Param, ...]] = ()

    def elementwise(self, params: dict[str, Any]) -> bool:
        """True when output[i] depends only on inputs[i], so tensors may be split in row chunks."""
        return False

    def check(self, plan: "MergePlan") -> list[str]:
        """Method-specific problems with a whole plan (e.g. options that cannot go together)."""
        return []

    def stats_passes(self, plan: "MergePlan", stats: dict[str, Any]) -> Iterator[StatsPass]:
        """Passes to run before merging; each may read the results of the previous ones in ``stats``."""
        return iter(())

    def merge(self, job: TensorJob) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def param(cls, name: str) -> Param:
        return next(p for p in cls.params if p.name == name)


REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in REGISTRY:
        raise ValueError(f"merge method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls
