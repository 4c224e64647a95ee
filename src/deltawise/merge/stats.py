"""Exact whole-model order statistics of |task vector| in bounded memory.

The official TIES/TALL/PCB code takes top-k over the whole flattened model. Holding a
flattened 7B-parameter delta is not an option, so we select exactly with a two-pass radix
select on the float32 bit patterns (for non-negative floats the bit pattern orders like the
value): pass 1 counts the upper 16 bits of every |delta| entry (32768 bins per model), which
locates the bin holding each requested rank; pass 2 counts the lower 16 bits inside those
bins only. Memory: a few hundred KB per requested rank, whatever the model size.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Optional

import torch

import deltawise.merge.fused_sparse as fused_sparse
from deltawise.merge.base import StatsPass, TensorJob

HIGH_BINS = 1 << 15  # sign bit is 0 for |x|
LOW_BINS = 1 << 16

# a function from a job to the per-model tensors whose magnitudes are ranked
Source = Callable[[TensorJob], list[torch.Tensor]]


_kept = threading.local()
POOL_BYTES = 256 * 2**20  # kept magnitudes up to this size stay allocated for the thread's next tensor


def kept_buffers(count: int, numel: int) -> list[torch.Tensor]:
    """``count`` float32 buffers of ``numel`` entries for one tensor's kept magnitudes. Up to POOL_BYTES in all
    they lie in memory this thread reuses for its next tensor (the engine ranks a tensor's chunks on one thread
    and is done with them before that thread starts another): pages faulted in afresh for every tensor cost
    more than the pass that fills them. Larger ones are allocated for this tensor alone."""
    if count * numel * 4 > POOL_BYTES:
        return [torch.empty(numel, dtype=torch.float32) for _ in range(count)]
    buffer = getattr(_kept, "buffer", None)
    if buffer is None or buffer.numel() < count * numel:
        buffer = _kept.buffer = None  # the old one is freed before the larger one is allocated
        buffer = _kept.buffer = torch.empty(count * numel, dtype=torch.float32)
    return [buffer[i * numel : (i + 1) * numel] for i in range(count)]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.abs().to(torch.float32).reshape(-1).view(torch.int32)


class _HighPass(StatsPass):
    label = "whole-model magnitudes (1/2)"

    def __init__(self, source: Source, n_models: int, raw: bool = False, keep_numel: Optional[int] = None,
                 keep_16bit: Optional[int] = None):
        self.source = source
        self.counts = torch.zeros(n_models, HIGH_BINS, dtype=torch.int64)
        self.keep_numel = keep_numel
        self.keep_16bit = keep_16bit  # kept whatever the size where every input is bfloat16 or float16
        self.magnitudes: Optional[list[torch.Tensor]] = None  # |x| of the whole tensor, kept from raw chunks
        if raw:  # the source is the plain task vectors: the fused kernel can count raw chunks
            self.update_raw = self._update_raw

    def _update_raw(self, chunk: "fused_sparse.RawChunk") -> None:
        gathers = None
        if self.keep_16bit is not None:  # decided on the first chunk
            if all(t.dtype in (torch.bfloat16, torch.float16) for t in [chunk.base, *chunk.models]):
                self.keep_numel = self.keep_16bit
            self.keep_16bit = None
        if self.keep_numel is not None:
            if self.magnitudes is None:
                self.magnitudes = kept_buffers(len(self.counts), self.keep_numel)
            n = chunk.base.numel()
            gathers = [m[chunk.offset : chunk.offset + n] for m in self.magnitudes]
        fused_sparse.histogram(chunk, list(self.counts), [-1] * len(self.counts), gathers)

    def update(self, job: TensorJob) -> None:
        for i, values in enumerate(self.source(job)):
            # counted where the values are: shipping every chunk's bits to the host would cost
            # more than the GPU merge itself; the counts follow the values' device on first use
            self.counts = self.counts.to(values.device)
            self.counts[i] += torch.bincount(_bits(values) >> 16, minlength=HIGH_BINS)


class _LowPass(StatsPass):
    label = "whole-model magnitudes (2/2)"

    def __init__(self, source: Source, wanted: list[set[int]], raw: bool = False,
                 magnitudes: Optional[list[torch.Tensor]] = None, listed: Optional[list[Optional[int]]] = None):
        self.source = source
        self.counts = [{hi: torch.zeros(LOW_BINS, dtype=torch.int64) for hi in bins} for bins in wanted]
        self.magnitudes = magnitudes  # the whole tensor's |x| from the first pass: counted once, not chunk by chunk
        self.kept_input = magnitudes is not None
        # listed[i]: model i's magnitudes become tie keys on the way, with this many entries in its bins
        self.listed = listed or [None] * len(wanted)
        self.tie_keys: list[Optional[fused_sparse.TieKeys]] = [None] * len(wanted)
        if raw:
            self.update_raw = self._update_raw

    def update_kept(self) -> None:
        if self.magnitudes is not None:
            for i, (values, counters) in enumerate(zip(self.magnitudes, self.counts)):
                if counters:
                    self.tie_keys[i] = fused_sparse.histogram_magnitudes(values, counters, self.listed[i])
            self.magnitudes = None

    def _update_raw(self, chunk: "fused_sparse.RawChunk") -> None:
        if self.kept_input:  # counted from the kept magnitudes, once
            self.update_kept()
            return
        # one kernel call per round of wanted bins (a Breadcrumbs band wants two per model)
        wanted = [sorted(c) for c in self.counts]
        for j in range(max((len(w) for w in wanted), default=0)):
            fused_sparse.histogram(chunk, [self.counts[i][w[j]] if j < len(w) else None for i, w in enumerate(wanted)],
                                   [w[j] if j < len(w) else -1 for w in wanted])

    def update(self, job: TensorJob) -> None:
        for i, values in enumerate(self.source(job)):
            if not self.counts[i]:
                continue
            bits = _bits(values)
            high = bits >> 16
            counters = self.counts[i]
            for hi in counters:
                counters[hi] = counters[hi].to(values.device)
                counters[hi] += torch.bincount(bits[high == hi] & 0xFFFF, minlength=LOW_BINS)


class OrderStatistics:
    """For each model, the values of |x| at the requested 1-indexed ascending ranks.

    ``ranks[i]`` lists the ranks wanted for model i (None entries are passed through as None).
    Run the passes from ``passes()`` through the engine, then read ``values``; ``below`` and
    ``equal`` count the entries smaller than and equal to each value (how many ties a rank
    falls among, which exact top-k selection needs). With ``raw`` (the source is ``job.deltas``)
    the passes also count raw chunks with the fused kernel (``update_raw``).

    With ``tie_keys`` (the tie order follows: ``thresholds.TieOrder``), where the second pass counts
    magnitudes the first one kept, it turns those of each model whose ranks lie in distinct upper bins
    into ``fused_sparse.tie_select``'s keys on its way: ``tie_keys[i]`` is then their ``TieKeys``, and
    ``magnitudes[i]`` no longer holds magnitudes.
    """

    def __init__(self, source: Source, ranks: list[list[Optional[int]]], raw: bool = False,
                 keep_numel: Optional[int] = None, keep_16bit: Optional[int] = None, tie_keys: bool = False):
        self.source = source
        self.raw = raw  # source is the plain task vectors (job.deltas): the passes also take raw chunks
        # per-tensor ranks of a tensor this small: the first raw pass keeps |x| (4 bytes an entry per model), the
        # second counts from it and the tie passes read it, instead of each reading the inputs again
        # (keep_16bit: of a tensor this size whose inputs are all bfloat16 or float16)
        self.keep_numel = keep_numel
        self.keep_16bit = keep_16bit
        self.magnitudes: Optional[list[torch.Tensor]] = None
        self.make_tie_keys = tie_keys
        self.tie_keys: list[Optional[fused_sparse.TieKeys]] = [None] * len(ranks)
        self.ranks = ranks
        self.values: list[list[Optional[float]]] = [[None] * len(r) for r in ranks]
        self.below: list[list[Optional[int]]] = [[None] * len(r) for r in ranks]
        self.equal: list[list[Optional[int]]] = [[None] * len(r) for r in ranks]

    def _listed(self, high: _HighPass, wanted: list[set[int]]) -> Optional[list[Optional[int]]]:
        """_LowPass's ``listed``: for each model whose kept magnitudes become tie keys, the entries in its bins."""
        if not self.make_tie_keys or high.magnitudes is None or not fused_sparse.tie_select_fits(len(high.magnitudes[0])):
            return None
        # one boundary value in each bin: two ranks in one bin could be two values, which the keys need apart
        return [sum(int(high.counts[i][hi]) for hi in bins) if bins and len(bins) == sum(r is not None for r in ranks)
                else None for i, (bins, ranks) in enumerate(zip(wanted, self.ranks))]

    def passes(self) -> Iterator[StatsPass]:
        high = _HighPass(self.source, len(self.ranks), self.raw, self.keep_numel, self.keep_16bit)
        yield high
        located: list[list[Optional[tuple[int, int, int]]]] = []  # (high bin, rank in bin, count below bin)
        for i, ranks in enumerate(self.ranks):
            cum = high.counts[i].cumsum(0)
            total = int(cum[-1])
            row = []
            for r in ranks:
                if r is None:
                    row.append(None)
                    continue
                if not 1 <= r <= total:
                    raise ValueError(f"rank {r} outside 1..{total}")
                hi = int(torch.searchsorted(cum, r))
                below = int(cum[hi - 1]) if hi > 0 else 0
                row.append((hi, r - below, below))
            located.append(row)
        self.magnitudes = high.magnitudes
        wanted = [{loc[0] for loc in row if loc} for row in located]
        low = _LowPass(self.source, wanted, self.raw, high.magnitudes, self._listed(high, wanted))
        yield low
        self.tie_keys = low.tie_keys
        for i, row in enumerate(located):
            for j, loc in enumerate(row):
                if loc is None:
                    continue
                hi, r, below_bin = loc
                counts = low.counts[i][hi].cpu()
                cum = counts.cumsum(0)
                lo = int(torch.searchsorted(cum, r))
                self.below[i][j] = below_bin + (int(cum[lo - 1]) if lo > 0 else 0)
                self.equal[i][j] = int(counts[lo])
                bits = torch.tensor([(hi << 16) | lo], dtype=torch.int32)  # on the host, whatever the counts' device
                self.values[i][j] = float(bits.view(torch.float32))
