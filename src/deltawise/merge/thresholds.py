"""Magnitude thresholds for TIES and Breadcrumbs, per tensor or over the whole model.

Both granularities rank |task vector| entries exactly with ``stats.OrderStatistics`` (a
streaming radix select), so a tensor never has to be held whole: per-tensor ranks are
gathered over the tensor's row chunks, global ranks over every chunk of the model. The
official TIES and Breadcrumbs experiments rank over the whole model; mergekit within each
tensor. Global mode needs a density that does not vary between tensors.

Counting rules (n entries, keep fraction k):
- "mergekit" (per tensor): keep max(1, int(k*n)) entries: threshold s_(n - keep + 1);
- "official" (global TIES): keep |x| >= s_(n - int(k*n)), as the paper's ``topk_values_mask``;
- Breadcrumbs band: ascending ranks (n_bot, n_bot + n_keep], see ``sparsify.band_counts``.
A threshold of None keeps everything; +inf keeps nothing.

Tie rules (entries whose magnitude equals a boundary value; in bfloat16 and float16 there are
many, since those formats have 256 and 1024 values per binade):
- tie_rule "mergekit" (per-tensor TIES and Breadcrumbs, the default): exactly the count above,
  and among equal magnitudes the entries mergekit 0.1.5 keeps: it takes the first k positions of
  ``torch.argsort(|tau|.float(), descending=True)`` (sparsify.py ``magnitude``) or the band
  ``torch.sort(|tau|.float()).indices[n_bot:n_bot + n_keep]`` (``magnitude_outliers``). On CPU
  that sort is not stable (std::sort, an introsort), so which of the equal entries it keeps
  depends on every value of the tensor: ``TieOrder`` reproduces it by running the same sort on
  the tensor's magnitudes, gathered whole (4 bytes per entry: the fused kernel sorts them in place,
  following only the partitions that hold the window's edges, on keys that the second radix pass
  made on its way; the torch fallback adds torch's 8-byte indices), and only for a tensor whose
  boundary actually falls among equal values. Where every input is bfloat16 or float16 (whose
  boundaries are nearly always tied) the radix passes keep a tensor's magnitudes whole whatever
  its size, so the tie pass reads nothing again. mergekit run with ``--cuda`` sorts on the GPU
  and may keep other entries among equals.
- tie_rule "index": exactly the count above, and among equal magnitudes the order of a stable
  sort (the lower flat index ranks first, in the descending order of TIES as in the ascending
  order of Breadcrumbs); one more streaming pass, nothing held whole (``TieIndex``).
- tie_rule "all": every entry equal to a boundary value is kept (more than k when the k-th
  value is tied); streams without holding a tensor whole.
- global granularity (official TIES code): keep |x| >= the threshold, every tie kept, as the
  paper's ``topk_values_mask`` (``kthvalue`` then ``>=``); Breadcrumbs' global band likewise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional

import torch

import deltawise.merge.fused_sparse as fused_sparse
from deltawise.merge.base import StatsPass, TensorJob
from deltawise.merge.params import Param
from deltawise.merge.sparsify import band_counts
from deltawise.merge.stats import OrderStatistics

if TYPE_CHECKING:
    from deltawise.merge.plan import MergePlan

TENSOR_OR_GLOBAL = Param(
    "granularity", str, "tensor", choices=("tensor", "global"),
    help="rank magnitudes within each tensor (mergekit) or over the whole model (paper code)",
)
TIE_RULE = Param(
    "tie_rule", str, "mergekit", choices=("mergekit", "index", "all"),
    help="per tensor, among entries equal to the boundary magnitude: keep exactly k as mergekit does (sorts a tensor whole), "
         "exactly k by lowest index (streams), or all of them",
)
NOTHING = float("inf")
# per-tensor ranks keep the tensor's |tau| (4 bytes an entry per model) up to this size, so that the
# second radix pass and the tie passes need not read the inputs again (larger tensors are read again)
KEEP_BYTES = 256 * 2**20


# tie_rule "mergekit" per tensor keeps a tensor's |tau| whatever its size when the inputs are bfloat16 or float16:
# their boundary magnitudes are nearly always tied, and TieOrder then needs them whole anyway
KEEP_WHOLE_16BIT = True


def _keep(n: int, n_models: int, per_tensor: bool, tie_rule: str) -> dict[str, Any]:
    """OrderStatistics' keep_numel, keep_16bit and tie_keys (TieOrder takes the kept magnitudes as keys)."""
    return {"keep_numel": n if per_tensor and n * n_models * 4 <= KEEP_BYTES else None,
            "keep_16bit": n if per_tensor and tie_rule == "mergekit" and KEEP_WHOLE_16BIT else None,
            "tie_keys": per_tensor and tie_rule == "mergekit"}


def _deltas(job: TensorJob):
    return job.deltas()


def keep_rank(n: int, density: float, rule: Literal["mergekit", "official"]) -> tuple[Optional[int], bool]:
    """(rank whose value is the threshold or None, keep_nothing)."""
    if density >= 1 or n == 0:
        return None, False
    if rule == "mergekit":
        if density <= 0:
            return None, True
        return n - max(1, int(density * n)) + 1, False
    rank = n - int(n * density)
    return (rank if rank > 0 else None), False


def topk_passes(
    n: int, densities: list[float], rule, stats: dict[str, Any], tie_rule: str = "all", per_tensor: bool = False,
) -> Iterator[StatsPass]:
    """Sets stats["thresholds"][i]: keep |tau_i| >= threshold, and stats["tie_keep"][i]: None, or
    (tie_rule "mergekit" or "index", when the k-th magnitude is tied) the sorted flat indices of the
    tied entries kept; the threshold is then exclusive (see ``sparsify.trim_listed``)."""
    plan = [keep_rank(n, k, rule) for k in densities]
    order = OrderStatistics(_deltas, [[rank] for rank, _ in plan], raw=True, **_keep(n, len(plan), per_tensor, tie_rule))
    if any(rank is not None for rank, _ in plan):
        yield from order.passes()
    stats["thresholds"] = [NOTHING if nothing else values[0] for (_, nothing), values in zip(plan, order.values)]
    stats["tie_keep"] = [None] * len(plan)
    if tie_rule == "all":
        return
    windows = {}
    for i, (rank, nothing) in enumerate(plan):
        if rank is not None and not nothing and n - order.below[i][0] != n - rank + 1:
            above = n - order.below[i][0] - order.equal[i][0]
            windows[i] = _Window(descending=True, start=0, stop=n - rank + 1, boundaries=(order.values[i][0],), before=(above,),
                                 ties=order.equal[i][0])
    if windows:
        tie_pass = (TieOrder(n, windows, order.magnitudes, order.tie_keys) if tie_rule == "mergekit"
                    else TieIndex(windows, order.magnitudes))
        yield tie_pass
        stats["tie_keep"] = [tie_pass.kept.get(i) for i in range(len(plan))]


def band_passes(
    n: int, densities: list[float], gammas: list[float], stats: dict[str, Any], tie_rule: str = "all",
    per_tensor: bool = False,
) -> Iterator[StatsPass]:
    """Sets stats["bands"][i] = (lower, upper): keep lower <= |tau_i| <= upper, and stats["tie_keep"]
    as ``topk_passes`` (with listed ties, both bounds are exclusive)."""
    ranks, empty = [], []
    for k, g in zip(densities, gammas):
        n_bot, n_keep = band_counts(n, k, g)
        full = k >= 1 or n == 0
        ranks.append([None, None] if full or n_keep == 0 else [n_bot + 1, n_bot + n_keep])
        empty.append(not full and n_keep == 0)
    order = OrderStatistics(_deltas, ranks, raw=True, **_keep(n, len(ranks), per_tensor, tie_rule))
    if any(r[0] is not None for r in ranks):
        yield from order.passes()
    stats["bands"] = [(NOTHING, 0.0) if e else (lo, hi) for e, (lo, hi) in zip(empty, order.values)]
    stats["tie_keep"] = [None] * len(ranks)
    if tie_rule == "all":
        return
    windows = {}
    for i, (first, last) in enumerate(ranks):
        if first is None:
            continue
        lower_splits = order.below[i][0] != first - 1
        upper_splits = order.below[i][1] + order.equal[i][1] != last
        if lower_splits or upper_splits:
            windows[i] = _Window(descending=False, start=first - 1, stop=last, boundaries=tuple(order.values[i]),
                                 before=tuple(order.below[i]), ties=sum(order.equal[i]))
    if windows:
        tie_pass = (TieOrder(n, windows, order.magnitudes, order.tie_keys) if tie_rule == "mergekit"
                    else TieIndex(windows, order.magnitudes))
        yield tie_pass
        stats["tie_keep"] = [tie_pass.kept.get(i) for i in range(len(ranks))]


@dataclass(frozen=True)
class _Window:
    """Positions [start, stop) of the sorted magnitudes that are kept; ``boundaries``: the values at its
    ends; ``before[j]``: how many entries precede those equal to ``boundaries[j]`` in that order;
    ``ties``: how many entries equal a boundary value in all (0: unknown)."""

    descending: bool
    start: int
    stop: int
    boundaries: tuple[float, ...]
    before: tuple[int, ...] = ()
    ties: int = 0


def chunk_offset(job: TensorJob) -> int:
    """Flat index of the chunk's first entry within the whole tensor (chunks are whole rows)."""
    like = job.models[0]
    if like.dim() == 0 or like.shape[0] == 0:
        return 0
    return job.row_start * (like.numel() // like.shape[0])


class TieOrder(StatsPass):
    """Which entries at a tied boundary magnitude mergekit keeps, for some models of one tensor.

    Gathers the tensor's |tau| as float32 on the CPU (mergekit's ``w = tensor.abs().reshape(-1).float()``)
    and sorts it with the very call mergekit makes, so the unstable sort orders the ties the same
    way; ``kept[i]`` are the sorted flat indices of the entries inside the kept window whose value
    is one of its boundary values (entries strictly inside are kept by the bounds themselves).
    """

    label = "tie order at the top-k boundary"

    def __init__(self, n: int, windows: dict[int, _Window], kept_magnitudes: Optional[list[torch.Tensor]] = None,
                 tie_keys: Optional[list[Optional["fused_sparse.TieKeys"]]] = None):
        self.windows = windows
        # the magnitudes the radix passes kept from raw chunks, when they did: nothing left to gather
        self.preloaded = self.kept_input = kept_magnitudes is not None
        self.magnitudes = {i: kept_magnitudes[i] if kept_magnitudes is not None else torch.empty(n, dtype=torch.float32)
                           for i in windows}
        # where the second radix pass already turned them into the tie order's keys (OrderStatistics' tie_keys)
        self.tie_keys = {i: tie_keys[i] for i in windows} if tie_keys is not None else {}
        self._kept: Optional[dict[int, torch.Tensor]] = None

    def update(self, job: TensorJob) -> None:
        offset = chunk_offset(job)
        deltas = job.deltas()
        for i, buffer in self.magnitudes.items():
            flat = deltas[i].abs().reshape(-1)
            buffer[offset : offset + flat.numel()] = flat.to(device="cpu", dtype=torch.float32)

    def update_raw(self, chunk: "fused_sparse.RawChunk") -> None:
        if self.preloaded:
            return
        n = chunk.base.numel()
        fused_sparse.gather(chunk, [self.magnitudes[i][chunk.offset : chunk.offset + n] if i in self.magnitudes else None
                                    for i in range(len(chunk.models))])

    @property
    def kept(self) -> dict[int, torch.Tensor]:
        if self._kept is None:
            self._kept = {i: self._select(self.magnitudes.pop(i), w, self.tie_keys.get(i))
                          for i, w in self.windows.items()}
        return self._kept

    @staticmethod
    def _select(magnitudes: torch.Tensor, window: _Window, keys: Optional["fused_sparse.TieKeys"] = None) -> torch.Tensor:
        if fused_sparse.tie_select_fits(magnitudes.numel()):
            # the same sort, run only where a window edge lies, in the magnitudes' own buffer (not read again)
            # (tests/test_fused_sparse.py checks it against torch)
            capacity = min(window.stop - window.start, window.ties) if window.ties else window.stop - window.start
            return fused_sparse.tie_select(magnitudes, window.descending, window.start, window.stop, window.boundaries,
                                           capacity, overwrite=True, keys=keys)
        return TieOrder._sort_select(magnitudes, window)

    @staticmethod
    def _sort_select(magnitudes: torch.Tensor, window: _Window) -> torch.Tensor:
        # the same calls as mergekit 0.1.5 sparsify.py (magnitude / magnitude_outliers): the
        # order of equal values follows from the sort algorithm and the whole input
        if window.descending:
            order = torch.argsort(magnitudes, descending=True)
        else:
            order = torch.sort(magnitudes, descending=False).indices
        inside = order[window.start : window.stop]
        values = magnitudes[inside]
        at_boundary = torch.zeros_like(values, dtype=torch.bool)
        for boundary in set(window.boundaries):
            at_boundary |= values == boundary
        return inside[at_boundary].sort().values


class GlobalTopK:
    """Whole-model thresholds; densities and gammas come from the (uniform) per-model parameters."""

    def __init__(self, plan: "MergePlan"):
        self.total = sum(t.out_numel for t in plan.merged)
        first = plan.merged[0]
        self.densities = [p["density"] for p in first.model_params]
        self.gammas = [p.get("gamma", 0.0) for p in first.model_params]

    @staticmethod
    def used(plan: "MergePlan") -> bool:
        return any(t.params.get("granularity") == "global" for t in plan.merged)

    @staticmethod
    def check(plan: "MergePlan") -> list[str]:
        if not GlobalTopK.used(plan):
            return []
        if len({t.params["granularity"] for t in plan.merged}) > 1:
            return ["granularity must be the same for every tensor when 'global' is used"]
        first = plan.merged[0]
        for t in plan.merged:
            for key in ("density", "gamma"):
                if [p.get(key) for p in t.model_params] != [p.get(key) for p in first.model_params]:
                    return [f"with granularity: global, {key} must not vary between tensors ({t.name} differs)"]
        return []


class TieIndex(StatsPass):
    """Which entries at a tied boundary magnitude a stable sort keeps, streaming.

    In a stable sort the entries equal to a boundary value ``b`` come in flat-index order right
    after the ``before`` entries that precede them, so the one with tie rank r (0-based, by index)
    lands at position before + r: it is kept when that lies in the window. The pass records each
    chunk's tied positions; ``kept[i]`` are then the sorted flat indices of the kept ties.
    """

    label = "tie ranks at the top-k boundary"

    def __init__(self, windows: dict[int, _Window], kept_magnitudes: Optional[list[torch.Tensor]] = None):
        self.windows = windows
        self.found: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {i: [] for i in windows}
        self._kept: Optional[dict[int, torch.Tensor]] = None
        self.kept_magnitudes = kept_magnitudes  # the whole tensor's |tau| from the radix passes, if they kept it
        self.kept_input = kept_magnitudes is not None

    def update_kept(self) -> None:
        if self.kept_magnitudes is not None:  # the whole tensor at once
            for i in self.windows:
                self._record(i, 0, self.kept_magnitudes[i])
            self.kept_magnitudes = None

    def update(self, job: TensorJob) -> None:
        deltas = job.deltas()
        for i in self.windows:
            self._record(i, chunk_offset(job), deltas[i].abs().reshape(-1).to(device="cpu", dtype=torch.float32))

    def update_raw(self, chunk: "fused_sparse.RawChunk") -> None:
        if self.kept_input:  # the whole tensor at once, on the first chunk
            self.update_kept()
            self.update_raw = lambda chunk: None
            return
        magnitudes = {i: torch.empty(chunk.base.numel(), dtype=torch.float32) for i in self.windows}
        fused_sparse.gather(chunk, [magnitudes.get(i) for i in range(len(chunk.models))])
        for i, flat in magnitudes.items():
            self._record(i, chunk.offset, flat)

    def _record(self, i: int, offset: int, flat: torch.Tensor) -> None:
        values = torch.tensor(self.windows[i].boundaries, dtype=torch.float32)
        hit = flat == values[0]  # one or two values: comparisons, not torch.isin (which sorts, ~20x slower here)
        for value in values[1:]:
            hit |= flat == value
        tied = hit.nonzero().squeeze(1)
        self.found[i].append((offset, tied + offset, flat[tied]))

    @property
    def kept(self) -> dict[int, torch.Tensor]:
        if self._kept is None:
            self._kept = {i: self._select(self.found.pop(i), w) for i, w in self.windows.items()}
        return self._kept

    @staticmethod
    def _select(found: list[tuple[int, torch.Tensor, torch.Tensor]], window: _Window) -> torch.Tensor:
        found.sort(key=lambda part: part[0])  # chunk order, whatever order the chunks came in
        positions = torch.cat([p for _, p, _ in found]) if found else torch.zeros(0, dtype=torch.int64)
        values = torch.cat([v for _, _, v in found]) if found else torch.zeros(0)
        keep = torch.zeros_like(positions, dtype=torch.bool)
        for boundary, before in dict(zip(window.boundaries, window.before)).items():
            mine = (values == boundary).nonzero().squeeze(1)
            rank = torch.arange(mine.numel()) + before
            keep[mine[(rank >= window.start) & (rank < window.stop)]] = True
        return positions[keep]
