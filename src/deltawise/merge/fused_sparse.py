"""The fused CPU path of the sparsifying merges (TIES, DARE, Breadcrumbs, DELLA, Consensus): raw chunks in,
output out.

Kernels in ``deltawise/_fused_sparse.c``. Each works on the bytes the engine has read (bfloat16,
float16 or float32) without making float32 copies of the chunk:

- ``histogram`` / ``gather``: the radix-select passes of ``stats.OrderStatistics`` and the tie
  passes of ``thresholds.py`` over |x - b|; ``histogram_magnitudes``: the second radix pass over
  magnitudes the first one kept (two upper bins per read), which can make ``tie_select``'s keys on
  its way (``TieKeys``);
- ``run``: the merge itself, ``sparsify.combine``'s float32 arithmetic operation for operation
  (trim, rescale, weight, sign election, disjoint mean or sum, Consensus's TALL masks, lambda,
  + base, cast), so the same bits as the torch path (tests/test_fused_sparse.py,
  tests/test_fused_della.py);
- ``keep_mask``: DARE's keep mask, the numbers ``TensorJob.uniform`` draws (torch's MT19937,
  seeded per block), so the same masks;
- ``della_mask``: DELLA's keep mask, the same draws against the keep probability of each entry's
  magnitude rank within its row (a stable radix sort per row, ``_fused_della.c``);
- ``tie_select``: the entries torch's CPU sort (libstdc++'s introsort) places in a window,
  following only the ranges that hold a window edge: mergekit's order among tied magnitudes
  without sorting the tensor, on one 4-byte key per entry (the magnitude's bits; the tied entries
  tagged in a range of keys that compares as one value), in place of the kept magnitudes.

The engine takes this path where ``ChunkLoader.fused_spec`` allows it (CPU, extension built,
inputs read from files, no float64); elsewhere the methods' torch code runs, with the same result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

import deltawise.merge.fused as fused
from deltawise.merge.base import RNG_BLOCK_ELEMENTS
from deltawise.merge.sparsify import rank_probabilities

_kernels = fused._kernels
NONE, WINDOW, MASK = 0, 1, 2  # trim modes of the kernel
NO_RESCALE, MULTIPLY, DIVIDE = 0, 1, 2


@dataclass(frozen=True)
class SparseSpec:
    """A sparsifying merge as the kernel runs it; the per-tensor parts come from the stats at run time.

    trim: "topk" (stats thresholds and tie_keep), "band" (stats bands and tie_keep), "random" (DARE
    keep masks with ``densities``, rescaled per ``rescale``: None, "l1" from stats scales, or
    "inverse_density"), "della" (DELLA's rank-based keep masks with ``densities`` and ``epsilons``,
    rescaled as "random"), or "none". election: None (plain sum, divided by the summed weights if
    ``normalize``), "mergekit" (a zero sum elects +) or "ties" (a zero sum elects the model's
    majority sign, stats["majority_sign"]). tall: Consensus's selection of the aggregate by TALL masks."""

    weights: tuple[float, ...]
    trim: Literal["topk", "band", "random", "della", "none"]
    election: Optional[Literal["mergekit", "ties"]]
    normalize: bool
    scale: float
    densities: tuple[float, ...] = ()
    rescale: Optional[Literal["l1", "inverse_density"]] = None
    epsilons: tuple[float, ...] = ()
    tall: Optional[tuple[int, tuple[float, ...]]] = None  # Consensus: (k, lambda_t per model), see ``run``


@dataclass
class RawChunk:
    """Rows of one tensor as stored (contiguous CPU tensors), for the passes that take raw chunks.

    ``offset``: flat index of the first entry; ``blame``: raises the error naming the input at
    fault when a kernel counted non-finite task-vector entries (and returns if none is)."""

    name: str
    base: torch.Tensor
    models: list[torch.Tensor]
    row_start: int
    offset: int
    blame: Callable[[], None]
    seed: int = 0
    shape: tuple[int, ...] = ()  # the chunk's shape
    masks: Optional[dict] = None  # keep masks drawn for this chunk, by (trim, model, density, epsilon); ("l1", *that): norms

    def checked(self, nonfinite: int) -> None:
        if nonfinite:
            self.blame()


def available() -> bool:
    return _kernels is not None and hasattr(_kernels, "sparse_merge")


def _raw(t: torch.Tensor):
    return t.reshape(-1).view(torch.uint8).numpy()


def _codes(models: list[torch.Tensor]) -> list[int]:
    return [fused.DTYPE_CODES[m.dtype] for m in models]


def histogram(chunk: RawChunk, counts: list[Optional[torch.Tensor]], highs: list[int],
              gathers: Optional[list[Optional[torch.Tensor]]] = None) -> None:
    """Adds to counts[i] (int64, contiguous CPU) the radix counts of |tau_i| in this chunk: upper 16 bits
    (highs[i] < 0) or lower 16 bits within upper bin highs[i]; None skips model i. ``gathers[i]``: also
    store |tau_i| there (float32, chunk-sized)."""
    gathers = gathers or [None] * len(chunk.models)
    bad = _kernels.delta_histogram(_raw(chunk.base), fused.DTYPE_CODES[chunk.base.dtype], [_raw(m) for m in chunk.models],
                                   _codes(chunk.models), [None if c is None else c.numpy() for c in counts], highs,
                                   [None if g is None else g.numpy() for g in gathers])
    chunk.checked(bad)


@dataclass(frozen=True)
class TieKeys:
    """Kept magnitudes that ``histogram_magnitudes`` turned into ``tie_select``'s keys while it counted them, for
    boundary values that lie one in each of the upper bins ``highs`` (ascending): every entry has its key but those
    of the bins, whose flat indices ``positions`` lists (uint32 as int32, ascending); ``tie_select`` finishes
    them, so the key pass does not read the whole tensor once more."""

    positions: torch.Tensor
    highs: tuple[int, ...]


def tie_select_fits(n: int) -> bool:
    """Whether ``tie_select`` runs for a tensor of ``n`` entries (else the tie order sorts with torch)."""
    return available() and n < 1 << 30


def histogram_magnitudes(values: torch.Tensor, counters: dict[int, torch.Tensor],
                         listed: Optional[int] = None) -> Optional[TieKeys]:
    """``histogram``'s lower-16-bit counts over float32 magnitudes already computed (one model): adds to
    counters[high] for each upper bin wanted, two bins per read of ``values``. With ``listed`` (the number of
    entries in those bins, at most two of them; ``tie_select_fits``): also turns ``values`` into tie keys in place
    and returns them (``TieKeys``)."""
    wanted = sorted(counters)
    if listed is not None:
        positions = torch.empty(listed, dtype=torch.int32)
        found = _kernels.magnitude_bins(values.numpy(), wanted, [counters[h].numpy() for h in wanted], positions.numpy())
        if found != listed:
            raise RuntimeError(f"{found} magnitudes in bins {wanted}, {listed} counted before")
        return TieKeys(positions, tuple(wanted))
    for j in range(0, len(wanted), 2):
        highs = wanted[j : j + 2]
        _kernels.magnitude_bins(values.numpy(), highs, [counters[h].numpy() for h in highs])
    return None


def gather(chunk: RawChunk, targets: list[Optional[torch.Tensor]]) -> None:
    """|tau_i| of this chunk as float32 into targets[i] (contiguous CPU, chunk-sized; None skips)."""
    bad = _kernels.delta_histogram(_raw(chunk.base), fused.DTYPE_CODES[chunk.base.dtype], [_raw(m) for m in chunk.models],
                                   _codes(chunk.models), [None] * len(chunk.models), [-1] * len(chunk.models),
                                   [None if t is None else t.numpy() for t in targets])
    chunk.checked(bad)


def l1_norms(chunk: RawChunk, masks: list[torch.Tensor]) -> list[tuple[float, float]]:
    """Per model (sum |tau|, sum |tau| where kept) over this chunk, in float64."""
    return _kernels.delta_l1(_raw(chunk.base), fused.DTYPE_CODES[chunk.base.dtype], [_raw(m) for m in chunk.models],
                             _codes(chunk.models), [m.numpy() for m in masks])


def tie_select(magnitudes: torch.Tensor, descending: bool, start: int, stop: int, boundaries: tuple[float, ...],
               capacity: int, overwrite: bool = False, keys: Optional[TieKeys] = None) -> torch.Tensor:
    """Sorted flat indices of the entries that torch.sort(magnitudes, descending) on the CPU places at
    positions [start, stop) and whose value is a boundary value (at most ``capacity`` of them).
    ``overwrite``: sort in the buffer of ``magnitudes`` (contiguous float32), leaving it scrambled, instead
    of a copy. ``keys``: ``histogram_magnitudes`` made the keys in that buffer already (so it is overwritten)."""
    out = torch.empty(max(capacity, 1), dtype=torch.int64)
    made: tuple = ()
    if keys is not None:
        made, overwrite = (keys.positions.numpy(), list(keys.highs)), True
    elif not (overwrite and magnitudes.is_contiguous()):
        magnitudes, overwrite = magnitudes.contiguous(), False
    found = _kernels.tie_select(magnitudes.numpy(), descending, start, stop, list(boundaries), out.numpy(), overwrite,
                                *made)
    return out[:found]


def block_seed(seed: int, name: str, model_index: int, block: int) -> int:
    """The torch.Generator seed of one RNG block (``TensorJob._block_rand``)."""
    key = f"{seed}|{name}|{model_index}|{block}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def _segments(seed: int, name: str, model_index: int, shape: tuple[int, ...], row_start: int):
    """(seeds, skips, lengths) of the RNG blocks that the chunk of ``shape`` at ``row_start`` draws from, as
    ``TensorJob._draw_uniform`` cuts them (blocks of whole rows; a 0-d or 1-d tensor is one stream)."""
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) < 2:
        return [block_seed(seed, name, model_index, 0)], [0], [numel]
    seeds, skips, lengths = [], [], []
    row = numel // shape[0] if shape[0] else 0
    block = max(1, RNG_BLOCK_ELEMENTS // max(1, row))
    first, last = row_start, row_start + shape[0]
    for k in range(first // block, (last - 1) // block + 1) if last > first else ():
        lo, hi = max(first, k * block), min(last, (k + 1) * block)
        seeds.append(block_seed(seed, name, model_index, k))
        skips.append((lo - k * block) * row)
        lengths.append((hi - lo) * row)
    return seeds, skips, lengths


def keep_mask(out: torch.Tensor, seed: int, name: str, model_index: int, shape: tuple[int, ...], row_start: int,
              density: float) -> torch.Tensor:
    """``TensorJob.uniform(model_index) < density`` for the chunk of ``shape`` at ``row_start`` as uint8
    into ``out`` (contiguous CPU, numel of the chunk): the same draws, without materialising them."""
    seeds, skips, lengths = _segments(seed, name, model_index, shape, row_start)
    _kernels.dare_mask(out.numpy(), seeds, skips, lengths, float(density))
    return out


def della_mask(out: torch.Tensor, chunk: RawChunk, model_index: int, density: float,
               epsilon: float) -> tuple[torch.Tensor, float, float]:
    """``TensorJob.uniform(i) < della.keep_probabilities(tau_i, density, epsilon)`` for model i of ``chunk`` as
    uint8 into ``out`` (contiguous CPU, numel of the chunk): each entry's rank within its row (dimension 1)
    and the same draws, so the same mask as the torch path. Also returns sum |tau_i| and sum |tau_i| where
    kept over the chunk (float64), DELLA's rescale norms."""
    shape = chunk.shape
    numel = chunk.base.numel()
    if len(shape) < 2:
        slab = line = max(numel, 1)
        stride = 1
    else:
        line = max(shape[1], 1)
        stride = max(1, numel // (shape[0] * line)) if shape[0] and line else 1
        slab = line * stride
    if numel == 0:
        return out, 0.0, 0.0
    model = chunk.models[model_index]
    probs = rank_probabilities(line, density, epsilon)
    seeds, skips, lengths = _segments(chunk.seed, chunk.name, model_index, shape, chunk.row_start)
    bad, before, after = _kernels.della_mask(
        out.numpy(), _raw(chunk.base), fused.DTYPE_CODES[chunk.base.dtype], _raw(model), fused.DTYPE_CODES[model.dtype],
        slab, line, stride, probs.numpy(), seeds, skips, lengths)
    chunk.checked(bad)
    return out, before, after


def _trims(spec: SparseSpec, stats: dict, n_models: int, masks: Optional[list[Optional[torch.Tensor]]]) -> list[tuple]:
    out = []
    ties = stats.get("tie_keep") or [None] * n_models
    for i, w in enumerate(spec.weights):
        mode, lower, upper, listed, mask, rescale, factor = NONE, None, None, None, None, NO_RESCALE, 1.0
        if spec.trim == "topk":
            lower = stats["thresholds"][i]
            listed = ties[i]
            mode = NONE if lower is None else WINDOW
        elif spec.trim == "band":
            lower, upper = stats["bands"][i]
            listed = ties[i]
            mode = NONE if lower is None and upper is None else WINDOW
        elif spec.trim in ("random", "della"):
            mask = masks[i] if masks is not None else None
            mode = NONE if mask is None else MASK
            density = spec.densities[i]
            if spec.trim == "della" and density <= 0:  # della.py keeps zeros_like(tau): +0, not tau * 0
                mode, lower, mask = WINDOW, float("inf"), None
            if spec.rescale == "l1":
                rescale, factor = MULTIPLY, stats["scales"][i]
            elif spec.rescale == "inverse_density" and 0 < density < 1:
                rescale, factor = DIVIDE, density
        out.append((float(w), mode, lower, upper, None if listed is None else listed.numpy(),
                    None if mask is None else mask.numpy(), rescale, float(factor)))
    return out


def run(spec: SparseSpec, out: torch.Tensor, chunk: RawChunk, stats: dict,
        masks: Optional[list[Optional[torch.Tensor]]] = None) -> int:
    """Fill ``out`` with the merged chunk; returns how many task-vector entries and stored entries are NaN or
    infinite (the caller names the input at fault, or refuses the output).

    With ``spec.tall`` = (k, lambdas) the aggregate tau_m is kept only where at least k models have
    |tau_t| > lambda_t |tau_m - tau_t| (tau_t untrimmed, unweighted), else 0, before lambda and the base."""
    divisor = None
    if spec.election is None and spec.normalize:
        total = sum(float(torch.tensor(w, dtype=torch.float32)) for w in spec.weights)  # as job.weights() sums
        divisor = total if abs(total) >= 1e-8 else None
    zero_positive = spec.election == "mergekit" or (spec.election == "ties" and stats.get("majority_sign", 1.0) > 0)
    return _kernels.sparse_merge(
        _raw(out), fused.DTYPE_CODES[out.dtype], _raw(chunk.base), fused.DTYPE_CODES[chunk.base.dtype],
        [_raw(m) for m in chunk.models], _codes(chunk.models), _trims(spec, stats, len(chunk.models), masks),
        spec.election is not None, zero_positive, spec.normalize, divisor, None if spec.scale == 1 else float(spec.scale),
        chunk.offset, None if spec.tall is None else (int(spec.tall[0]), [float(x) for x in spec.tall[1]]),
    )


def kept_norms(chunk: RawChunk, spec: SparseSpec) -> Optional[list[tuple[float, float]]]:
    """Per model (sum |tau|, sum |tau| where kept) over the chunk as ``keep_masks`` found them on the way (DELLA's
    masks), or None where it did not for every model (then ``l1_norms`` sums them)."""
    if spec.trim != "della" or chunk.masks is None:
        return None
    sums = [chunk.masks.get(("l1", spec.trim, i, d, e)) for i, (d, e) in enumerate(zip(spec.densities, spec.epsilons))]
    return None if any(s is None for s in sums) else sums


def keep_masks(chunk: RawChunk, spec: SparseSpec) -> list[Optional[torch.Tensor]]:
    """DARE's (trim "random") or DELLA's (trim "della") keep mask of each model for this chunk (uint8; None:
    density >= 1, every entry kept), cached on the chunk."""
    if chunk.masks is None:
        chunk.masks = {}
    out: list[Optional[torch.Tensor]] = []
    for i, density in enumerate(spec.densities):
        if density >= 1:
            out.append(None)
            continue
        epsilon = spec.epsilons[i] if spec.trim == "della" else None
        key = (spec.trim, i, density, epsilon)
        if key not in chunk.masks:
            mask = torch.empty(chunk.base.numel(), dtype=torch.uint8)
            if density <= 0:
                mask.zero_()
            elif spec.trim == "della":  # the norms come with the mask: L1Norms need not read the chunk again
                _, before, after = della_mask(mask, chunk, i, density, epsilon)
                chunk.masks[("l1", *key)] = (before, after)
            else:
                keep_mask(mask, chunk.seed, chunk.name, i, chunk.shape, chunk.row_start, density)
            chunk.masks[key] = mask
        out.append(chunk.masks[key])
    return out


def fused_spec(model_params: list[dict], trim: Literal["topk", "band", "random", "della", "none"],
               election: Optional[Literal["mergekit", "ties"]], normalize: bool, scale: float,
               rescale: Optional[Literal["l1", "inverse_density"]] = None,
               tall: Optional[tuple[int, tuple[float, ...]]] = None) -> fused.FusedSpec:
    """The ``MergeMethod.fused`` answer of a sparsifying merge (weights, densities and epsilons as the
    torch path reads them)."""
    weights = tuple(float(p.get("weight", 1.0)) for p in model_params)
    densities = tuple(float(p.get("density", 1.0)) for p in model_params)
    epsilons = tuple(float(p.get("epsilon", 0.0)) for p in model_params) if trim == "della" else ()
    sparse = SparseSpec(weights, trim, election, bool(normalize), float(scale), densities, rescale, epsilons, tall)
    return fused.FusedSpec("sparse", weights, scale=float(scale), sparse=sparse)
