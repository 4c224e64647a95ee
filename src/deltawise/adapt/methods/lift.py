"""LIFT: Low-rank Informed sparse Fine-Tuning of principal weights (Liu et al., 2025, "LIFT the Veil for the
Truth: Principal Weights Emerge after Rank Reduction for Reasoning-Focused Supervised Fine-Tuning";
code: zihanghliu/LIFT).

For every linear weight W ∈ R^{m×n} except the LM head: take the rank-r_f approximation
W̃ = U_{r_f} S_{r_f} V_{r_f}ᵀ (float32 SVD), and train only the k = min((m+n)·r_L, m·n) entries with the
largest |W̃| (the "principal weights": as many entries as a rank-r_L LoRA has parameters).
Everything else (biases, norms, embeddings, LM head) is frozen.

Each such linear becomes a ``PrincipalLinear``: W stays a frozen parameter (same name, so deltas
keep the base's parameter names) and the k masked entries are a trainable k-vector ``values``. Its
backward forms the dense gradient of W one matrix at a time, gathers it at the mask and drops it,
so gradients, AdamW moments, DDP all-reduce and gradient clipping all see k numbers per matrix,
as for a LoRA of rank r_L (the Trainer's ordinary AdamW *is* the sparse AdamW of the paper; weight
decay only reaches the masked entries). After every optimizer step ``values`` is written back into
W; every K = ``refresh_interval`` steps the mask is recomputed from the current W, entries in both
masks keep their Adam moments and new entries start at zero. In multi-process runs rank 0's mask
is broadcast, so every rank trains the same entries.
Sharded (FSDP2, adapt/sharding.py): W and ``values`` are DTensors holding 1/N of their rows between steps,
and whole inside forward and backward, where FSDP gathers them. The mask is chosen from the whole matrix
(every rank gathers W, in the same order, then rank 0's mask is broadcast) and kept whole on every rank; the
write-back puts into each rank's rows of W the masked entries that fall in them, and a refresh writes each
rank's share of the new ``values`` and Adam moments, so the sharded run trains what one process trains.
Defaults: r_L = ``rank`` 8 here (paper 128), r_f = ``filter_rank`` 8 (paper 32–128), K = 100 (paper 400).
Saved delta: sparse (bit-packed mask + float32 values), over the union of all masks used
(entries outside never change).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltawise.adapt.dist import broadcast_from_rank0
from deltawise.adapt.methods.base import DeltaMethod, MethodError, head_names, register, set_submodule
from deltawise.adapt.sharding import assign_rows, local_rows, whole
from deltawise.architecture import architecture_for
from deltawise.delta.sparse import SparseDelta
from deltawise.params import Param


@torch.no_grad()
def principal_mask(weight: torch.Tensor, filter_rank: int, lora_rank: int) -> torch.Tensor:
    """Sorted flat indices of the k largest-magnitude entries of the rank-``filter_rank`` approximation."""
    w = weight.detach().float()
    m, n = w.shape
    k = min((m + n) * lora_rank, m * n)
    r = min(filter_rank, m, n)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    approx = (u[:, :r] * s[:r]) @ vh[:r]
    return torch.topk(approx.abs().flatten(), k, sorted=False).indices.sort().values


class _MaskedGradLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W's gradient returned only at ``mask`` (as the gradient of ``values``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, mask):
        ctx.save_for_backward(x, weight, mask)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_values = None
        if ctx.needs_input_grad[3]:
            # the dense gradient of W exists only here, for one matrix at a time
            dense = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            grad_values = dense.view(-1)[mask]
        return grad_x, None, None, grad_values, None


class PrincipalLinear(nn.Module):
    """A linear layer whose weight trains only at ``mask``; ``values`` holds those entries."""

    def __init__(self, base: nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)
        self.bias = None if base.bias is None else base.bias.requires_grad_(False)
        self.register_buffer("mask", mask, persistent=False)
        self.values = nn.Parameter(self.weight.detach().view(-1)[mask].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaskedGradLinear.apply(x, self.weight, self.bias, self.values, self.mask)

    @torch.no_grad()
    def write_back(self) -> None:
        values = whole(self.values)  # sharded: every rank gathers the k values (modules in the same order)
        local, start = local_rows(self.weight)
        if start == 0 and local.shape == self.weight.shape:
            self.weight.data.view(-1)[self.mask] = values.to(self.weight.dtype)
            return
        # this rank's rows of W: the masked entries in them are one run of the sorted flat mask
        first, stop = start * self.in_features, (start + local.shape[0]) * self.in_features
        a, b = torch.searchsorted(self.mask, torch.tensor([first, stop], device=self.mask.device)).tolist()
        local.view(-1)[self.mask[a:b] - first] = values[a:b].to(local.dtype)


def _remap_state(optimizer: torch.optim.Optimizer, p: nn.Parameter, old: torch.Tensor, new: torch.Tensor, numel: int) -> None:
    """Move ``p``'s per-entry optimizer state (Adam moments) from mask ``old`` to mask ``new``:
    entries in both keep their state, new entries start at zero."""
    state = optimizer.state.get(p, {})
    for key, value in list(state.items()):
        if torch.is_tensor(value) and value.shape == p.shape:
            dense = torch.zeros(numel, dtype=value.dtype, device=value.device)
            dense[old] = whole(value)  # sharded: gathered on every rank, in the same order
            assign_rows(value, dense[new])


@register
class LIFT(DeltaMethod):
    name = "lift"
    summary = "sparse fine-tuning of the largest entries of a low-rank approximation of every linear weight"
    params = (
        Param("rank", int, 8, low=1,
              help="r_L, the LoRA-equivalent budget: min((in+out)·r_L, in·out) entries train per matrix (paper 128)"),
        Param("filter_rank", int, 8, low=1,
              help="r_f, rank of the approximation whose largest entries are the principal weights (paper 32-128)"),
        Param("refresh_interval", int, 100, low=0, help="K, optimizer steps between mask refreshes; 0: never (paper 400)"),
    )

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        self.lora_rank = self.values["rank"]
        self.filter_rank = self.values["filter_rank"]
        self.refresh_interval = self.values["refresh_interval"]
        self.steps = 0
        self.heads = head_names(model, task)
        for p in model.parameters():
            p.requires_grad_(False)
        roles = architecture_for(getattr(model, "config", None))
        linears = [(name, mod) for name, mod in model.named_modules()
                   if isinstance(mod, nn.Linear) and not roles.is_head(f"{name}.weight")]
        self.modules: dict[str, PrincipalLinear] = {}
        for name, linear in linears:
            wrapped = PrincipalLinear(linear, self._mask(linear.weight))
            set_submodule(model, name, wrapped)
            self.modules[name] = wrapped
        params = dict(model.named_parameters())
        for n in self.heads:
            params[n].requires_grad_(True)
        # base values (on CPU) of every entry that has been in a mask; entries outside never change
        self.seen = {name: (m.mask.cpu(), m.values.detach().cpu().clone()) for name, m in self.modules.items()}
        return model

    def _mask(self, weight: torch.Tensor) -> torch.Tensor:
        return broadcast_from_rank0(principal_mask(weight, self.filter_rank, self.lora_rank))

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for m in self.modules.values():
            m.write_back()
        self.steps += 1
        if self.refresh_interval > 0 and self.steps % self.refresh_interval == 0:
            self._refresh(optimizer)

    @torch.no_grad()
    def _refresh(self, optimizer: torch.optim.Optimizer) -> None:
        for name, m in self.modules.items():
            weight = whole(m.weight.detach())  # sharded: the whole matrix on every rank, modules in the same order
            new = self._mask(weight).to(m.mask.device)
            _remap_state(optimizer, m.values, m.mask, new, m.weight.numel())
            m.mask = new
            assign_rows(m.values, weight.view(-1)[new])  # k entries, as before: each rank keeps its share
            idx, base = self.seen[name]
            new_cpu = new.cpu()
            added = new_cpu[~torch.isin(new_cpu, idx)]
            if added.numel():  # first time in a mask: the current value is still the base value
                self.seen[name] = (torch.cat([idx, added]), torch.cat([base, weight.cpu().view(-1)[added]]))

    def resume_state(self) -> dict[str, torch.Tensor]:
        # the masks move at each refresh, and the base values of every entry ever masked are needed for the delta
        state = {"steps": torch.tensor(self.steps)}
        for name, m in self.modules.items():
            idx, base = self.seen[name]
            state.update({f"mask/{name}": m.mask, f"seen_index/{name}": idx, f"seen_base/{name}": base})
        return state

    def load_resume_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
        if "steps" not in state:
            raise MethodError("the checkpoint holds no LIFT state (masks); it cannot be resumed, start the run again")
        self.steps = int(state["steps"])
        for name, m in self.modules.items():
            m.mask = state[f"mask/{name}"].to(m.mask.device)
            self.seen[name] = (state[f"seen_index/{name}"], state[f"seen_base/{name}"])

    def deltas(self, model: nn.Module) -> dict[str, SparseDelta]:
        out = {}
        for name, m in self.modules.items():
            idx, base = self.seen[name]
            flat = m.weight.detach().cpu().float().clone().view(-1)
            flat[m.mask.cpu()] = m.values.detach().cpu().float()  # the current values, even between write-backs
            change = torch.zeros(flat.numel())
            change[idx] = flat[idx] - base.float()
            mask = torch.zeros(flat.numel(), dtype=torch.bool).index_fill_(0, idx, True)
            out[f"{name}.weight"] = SparseDelta.from_dense(change.view(m.weight.shape), mask.view(m.weight.shape))
        return out

    def count_params(self, model: nn.Module) -> tuple[int, int]:
        trainable, total = super().count_params(model)
        # ``values`` shadow entries of W: they are not extra parameters of the model
        return trainable, total - sum(m.values.numel() for m in self.modules.values())

    def record(self) -> dict:
        return {"entries_per_matrix": {f"{n}.weight": int(m.mask.numel()) for n, m in self.modules.items()},
                "lora_rank": self.lora_rank, "filter_rank": self.filter_rank, "refresh_interval": self.refresh_interval}
