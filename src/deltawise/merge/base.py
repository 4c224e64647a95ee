"""The merge-method interface and the per-tensor job the engine hands to methods.

A method is a small class registered by name. The engine does all I/O: it resolves the
recipe's parameters for each tensor, reads the inputs (as float32, or float64 if stored so)
in row chunks, and calls ``merge`` once per chunk. What a chunk cannot know on its own -- a
per-tensor magnitude threshold, a norm, a dot product -- is gathered first by streaming
passes over the chunks: ``tensor_passes`` for statistics of one tensor, ``stats_passes`` for
statistics of the whole model (global top-k). Chunks are whole rows (dimension 0), so methods
working along the last dimension see complete rows.

Data-driven methods (Fisher, RegMean) also read per-model statistics files beside the weights:
a method declares them as ``SideInput``s at plan time and the engine reads them with the
weights, into ``job.side`` (the same rows as the weight chunk, or the whole tensor).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Literal, Optional

import torch

from deltawise.merge.params import Param

if TYPE_CHECKING:
    from deltawise.merge.fused import FusedSpec
    from deltawise.io.reader import ModelReader
    from deltawise.merge.plan import MergePlan


# Random methods draw per block of whole rows of about this many entries; part of the output's
# definition (changing it changes DARE results for a given seed), unlike the engine's chunk size.
RNG_BLOCK_ELEMENTS = 1 << 20


@dataclass
class SideInput:
    """Per-model tensors read beside the weights (a Fisher or Gram file of each input model).

    ``name_of`` maps a model's tensor name to the name in its side file (None: no side tensor);
    ``whole``: read the whole side tensor for every chunk (a Gram matrix) instead of the rows of
    the weight chunk (a Fisher tensor shaped like the weight). A model whose side tensor is
    missing gets None in ``job.side[key]``.
    """

    key: str
    readers: list["ModelReader"]  # one per input model, in plan.inputs order
    name_of: Callable[[str], Optional[str]]
    whole: bool = False


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
    side: dict[str, list[Optional[torch.Tensor]]] = field(default_factory=dict)  # SideInput key -> per model
    # the engine's per-thread reusable memory (key, like) -> tensor; None: fresh tensors
    scratch_source: Optional[Callable[[Any, torch.Tensor], torch.Tensor]] = field(default=None, repr=False)
    # per model: its task vector for these rows when the input is a delta or adapter of this base, read
    # from the delta itself (exact), else None: tau = model - base
    exact_deltas: Optional[list[Optional[torch.Tensor]]] = field(default=None, repr=False)

    def scratch(self, key: Any, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped like ``like`` for the merge to fill (``out=``) and return.

        In the engine its memory is reused by the next chunk of the same thread (sparing a
        fresh allocation, whose page faults cost about as much as the arithmetic), so it must
        not be kept beyond ``merge``; each ``key`` names a distinct tensor."""
        if self.scratch_source is None:
            return torch.empty_like(like)
        return self.scratch_source(key, like)

    def deltas(self, scratch: bool = False) -> list[torch.Tensor]:
        """Task vectors tau_i = theta_i - theta_0; with ``scratch`` in ``scratch`` memory (one
        call per merge: a second call would overwrite the first's task vectors)."""
        if self.base is None:
            raise ValueError(f"{self.name}: this method needs a base model")
        exact = self.exact_deltas or [None] * len(self.models)
        out = []
        for i, (m, tau) in enumerate(zip(self.models, exact)):
            target = self.scratch(("delta", i), m) if scratch else None
            if tau is None:
                out.append(torch.sub(m, self.base, out=target) if scratch else m - self.base)
            else:  # a copy: callers modify task vectors in place, and ``tau`` may be a reader's cache
                out.append(target.copy_(tau) if scratch else tau.to(dtype=m.dtype, device=m.device, copy=True))
        return out

    def weights(self, default: float = 1.0) -> torch.Tensor:
        ref = self.models[0]
        return torch.tensor([p.get("weight", default) for p in self.model_params], dtype=ref.dtype, device=ref.device)

    def uniform(self, model_index: int) -> torch.Tensor:
        """Uniform [0, 1) numbers shaped like this chunk, identical whatever the chunking, thread
        count or device: the stream of each block of RNG_BLOCK_ELEMENTS (whole rows) is seeded by
        (seed, tensor, model, block) and drawn on the CPU. Cached: passes and the merge of one
        chunk see the same numbers without drawing them twice."""
        cache = self.__dict__.setdefault("_uniform", {})
        if model_index not in cache:
            cache[model_index] = self._draw_uniform(model_index)
        return cache[model_index]

    def _draw_uniform(self, model_index: int) -> torch.Tensor:
        like = self.models[0]
        if like.dim() < 2:
            return self._block_rand(model_index, 0, tuple(like.shape)).to(like.device)
        row_shape = tuple(like.shape[1:])
        block = max(1, RNG_BLOCK_ELEMENTS // max(1, like[0].numel()))
        first, last = self.row_start, self.row_start + like.shape[0]
        parts = []
        for k in range(first // block, (last - 1) // block + 1):
            values = self._block_rand(model_index, k, (block, *row_shape))
            parts.append(values[max(first, k * block) - k * block : min(last, (k + 1) * block) - k * block])
        return torch.cat(parts).to(like.device)

    def _block_rand(self, model_index: int, block: int, shape: tuple[int, ...]) -> torch.Tensor:
        key = f"{self.seed}|{self.name}|{model_index}|{block}".encode()
        gen = torch.Generator()
        gen.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1))
        return torch.rand(shape, generator=gen)


class StatsPass:
    """One streaming pass over every merged tensor, collecting whole-model statistics."""

    label = "collecting statistics"
    # True when the pass has all it needs from what an earlier pass kept (a tensor's magnitudes): where the
    # fused kernels run, the engine then calls ``update_kept`` once instead of reading the chunks again
    kept_input = False

    def update(self, job: TensorJob) -> None:
        raise NotImplementedError

    def update_kept(self) -> None:
        pass


class MergeMethod:
    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str] = ""
    # "required": tensors are merged relative to base_model; "input": base_model, if given, is
    # one more input (appended when not listed under models, as mergekit does); "optional":
    # relative to base_model when one is given (job.base), of the models themselves otherwise
    base_policy: ClassVar[Literal["required", "input", "optional"]] = "required"
    min_models: ClassVar[int] = 1  # inputs besides the base
    max_models: ClassVar[Optional[int]] = None
    params: ClassVar[tuple[Param, ...]] = ()
    # True when a NaN/inf in any input entry always makes the output entry NaN/inf (sums and
    # scalings only, no masks or comparisons): the engine then checks only the result
    propagates_nonfinite: ClassVar[bool] = False

    def check(self, plan: "MergePlan") -> list[str]:
        """Method-specific problems with a whole plan (e.g. options that cannot go together)."""
        return []

    def prepare(self, plan: "MergePlan", out: Path, device: torch.device) -> Optional[str]:
        """Work that needs whole tensors or several steps before the output is written (continual
        merging folds new models into its state, weight matching searches permutations). Returns
        a string identifying the result, which becomes part of the resume key, or None."""
        return None

    def locked_folders(self, plan: "MergePlan") -> list[Path]:
        """Folders the method writes besides the output (continual merging's state), locked for the whole merge."""
        return []

    def side_inputs(self, plan: "MergePlan") -> list[SideInput]:
        """Statistics files read beside the weights, opened at plan time (raise RecipeError)."""
        return []

    def stats_passes(self, plan: "MergePlan", stats: dict[str, Any]) -> Iterator[StatsPass]:
        """Passes to run before merging; each may read the results of the previous ones in ``stats``."""
        return iter(())

    def tensor_passes(
        self, params: dict[str, Any], model_params: list[dict[str, Any]], numel: int, stats: dict[str, Any]
    ) -> Iterator[StatsPass]:
        """Passes over the chunks of one tensor (``numel`` entries) before it is merged; results go
        into ``stats``, which the merge of each chunk then receives as ``job.stats``."""
        return iter(())

    def merge(self, job: TensorJob) -> torch.Tensor:
        raise NotImplementedError

    def fused(self, params: dict[str, Any], model_params: list[dict[str, Any]]) -> Optional["FusedSpec"]:
        """This merge as one of the fused CPU kernels (``fused.py``), or None (the default): the
        engine then calls ``merge``. A spec must give exactly the bits ``merge`` gives."""
        return None

    def copies(self, params: dict[str, Any], model_params: list[dict[str, Any]]) -> bool:
        """Whether this merge of a tensor is its one input unchanged (passthrough without a scale): the
        engine then copies the stored rows instead of converting them to float32 and back."""
        return False

    @classmethod
    def param(cls, name: str) -> Param:
        return next(p for p in cls.params if p.name == name)


def merge_tensor(
    method: MergeMethod,
    base: Optional[torch.Tensor],
    models: list[torch.Tensor],
    params: dict[str, Any],
    model_params: list[dict[str, Any]],
    *,
    name: str = "tensor",
    seed: int = 0,
    stats: Optional[dict[str, Any]] = None,
    side: Optional[dict[str, list[Optional[torch.Tensor]]]] = None,
) -> torch.Tensor:
    """Merge one in-memory tensor: run the method's per-tensor passes, then the merge.

    ``stats`` carries whole-model statistics when the method needs them (global granularity);
    ``side`` the per-model side tensors (as ``job.side``).
    """
    tensor_stats = dict(stats or {})
    job = TensorJob(name, base, models, params, model_params, tensor_stats, seed, side=dict(side or {}))
    for stats_pass in method.tensor_passes(params, model_params, models[0].numel(), tensor_stats):
        stats_pass.update(job)
    return method.merge(job)


REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in REGISTRY:
        raise ValueError(f"merge method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls
