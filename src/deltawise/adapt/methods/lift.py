"""LIFT: Low-rank Informed sparse Fine-Tuning of principal weights (Liu et al., 2025; zihanghliu/LIFT).

For every linear weight W ∈ R^{m×n} except the LM head: take the rank-r_f approximation
W̃ = U_{r_f} S_{r_f} V_{r_f}ᵀ (float32 SVD), and train only the k = min((m+n)·r_L, m·n) entries with the
largest |W̃| (the "principal weights": as many entries as a rank-r_L LoRA has parameters).
Everything else (biases, norms, embeddings, LM head) is frozen.

The optimizer is a sparse AdamW: moments exist only for the k masked entries; the dense gradient
is gathered at the mask as soon as it is accumulated and then freed (so gradient memory is one
matrix at a time, not the whole model); gradient clipping uses the norm of the masked gradients;
every K = ``--refresh-interval`` steps the mask is recomputed from the current weights, entries in
both masks keep their moments, new entries start at zero. Weight decay applies to masked entries only.
Defaults: r_L = ``--rank`` 8 here (paper 128), r_f = ``--filter-rank`` 8 (paper 32–128), K = 100 (paper 400).
Saved delta: sparse (bit-packed mask + float32 values), over the union of all masks used
(entries outside never change).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltawise.adapt.methods.base import DeltaMethod, MethodError, head_names, register
from deltawise.delta.sparse import SparseDelta


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


class SparseAdamW(torch.optim.Optimizer):
    """AdamW whose state lives only at each parameter's mask (group ``sparse=True``); dense groups
    (e.g. a classification head) get ordinary AdamW. Decoupled weight decay as in torch.optim.AdamW."""

    def __init__(self, sparse_params: list[nn.Parameter], dense_params: list[nn.Parameter], lr: float, weight_decay: float,
                 max_grad_norm: float, masks: dict[nn.Parameter, torch.Tensor], refresh, refresh_interval: int,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        groups = [{"params": sparse_params, "sparse": True}]
        if dense_params:
            groups.append({"params": dense_params, "sparse": False})
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))
        self.max_grad_norm = max_grad_norm
        self.refresh, self.refresh_interval = refresh, refresh_interval
        self.steps = 0
        # masks live outside ``self.state``: accelerate round-trips optimizer state through
        # load_state_dict, which casts every state tensor to the parameter's float dtype
        self.masks = masks
        for p in sparse_params:
            idx = masks[p]
            self.state[p] = {"grad": torch.zeros(idx.numel(), device=p.device),
                             "exp_avg": torch.zeros(idx.numel(), device=p.device), "exp_avg_sq": torch.zeros(idx.numel(), device=p.device)}
            p.register_post_accumulate_grad_hook(self._gather)

    def _gather(self, p: nn.Parameter) -> None:
        st = self.state[p]
        st["grad"] += p.grad.view(-1)[self.masks[p]]
        p.grad = None  # the dense gradient is not kept: memory stays at the mask's size

    @torch.no_grad()
    def step(self, closure=None):
        sq = sum(float((self.state[p]["grad"] ** 2).sum()) for p in self.param_groups[0]["params"])
        for g in self.param_groups[1:]:
            sq += sum(float((p.grad**2).sum()) for p in g["params"] if p.grad is not None)
        norm = math.sqrt(sq)
        clip = min(1.0, self.max_grad_norm / (norm + 1e-6)) if self.max_grad_norm > 0 else 1.0
        self.steps += 1
        for group in self.param_groups:
            b1, b2 = group["betas"]
            bc1, bc2 = 1 - b1**self.steps, 1 - b2**self.steps
            for p in group["params"]:
                if group["sparse"]:
                    st = self.state[p]
                    grad, flat = st["grad"] * clip, p.view(-1)
                    idx = self.masks[p]
                else:
                    if p.grad is None:
                        continue
                    st = self.state[p]
                    if "exp_avg" not in st:
                        st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p).view(-1), torch.zeros_like(p).view(-1)
                    grad, flat, idx = p.grad.view(-1) * clip, p.view(-1), None
                st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                update = (st["exp_avg"] / bc1) / ((st["exp_avg_sq"] / bc2).sqrt() + group["eps"])
                values = flat if idx is None else flat[idx]
                values = values * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * update
                if idx is None:
                    flat.copy_(values)
                else:
                    flat[idx] = values
                    st["grad"].zero_()
        if self.refresh_interval > 0 and self.steps % self.refresh_interval == 0:
            self._refresh_masks()

    @torch.no_grad()
    def _refresh_masks(self) -> None:
        for p in self.param_groups[0]["params"]:
            st = self.state[p]
            new = self.refresh(p)
            # moments of entries kept in the new mask survive; new entries start from zero
            for key in ("exp_avg", "exp_avg_sq"):
                dense = torch.zeros(p.numel(), device=p.device)
                dense[self.masks[p]] = st[key]
                st[key] = dense[new]
            self.masks[p] = new
            st["grad"] = torch.zeros(new.numel(), device=p.device)


@register
class LIFT(DeltaMethod):
    name = "lift"

    def prepare(self, model: nn.Module, task: str, seed: int) -> nn.Module:
        self.lora_rank = self.options.get("rank", 8)
        self.filter_rank = self.options.get("filter_rank", 8)
        self.heads = head_names(model, task)
        for p in model.parameters():
            p.requires_grad_(False)
        self.weights: dict[str, nn.Parameter] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and not name.endswith("lm_head") and name.split(".")[0] not in ("score", "classifier"):
                mod.weight.requires_grad_(True)  # gradients flow; only masked entries are ever updated
                self.weights[f"{name}.weight"] = mod.weight
        params = dict(model.named_parameters())
        for n in self.heads:
            params[n].requires_grad_(True)
        self.masks = {p: self._mask(p) for p in self.weights.values()}
        # base values of every entry that has been in a mask (entries outside never change)
        self.seen = {p: (idx.clone(), p.detach().view(-1)[idx].clone()) for p, idx in self.masks.items()}
        self.head_params = [params[n] for n in self.heads]
        return model

    def _mask(self, p: nn.Parameter) -> torch.Tensor:
        return principal_mask(p, self.filter_rank, self.lora_rank)

    def _refresh(self, p: nn.Parameter) -> torch.Tensor:
        new = self._mask(p)
        idx, base = self.seen[p]
        added = new[~torch.isin(new, idx)]
        if added.numel():  # first time in a mask: the current value is still the base value
            self.seen[p] = (torch.cat([idx, added]), torch.cat([base, p.detach().view(-1)[added]]))
        return new

    def count_trainable(self) -> int:
        return sum(int(i.numel()) for i in self.masks.values()) + sum(p.numel() for p in self.head_params)

    def make_optimizer(self, model, lr, weight_decay, max_grad_norm):
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # the gather-and-free gradient hook runs before DDP's all-reduce would see the gradient
            raise MethodError("lift runs in a single process for now; launch it without torchrun/accelerate multi-process")
        return SparseAdamW(
            list(self.weights.values()), self.head_params, lr, weight_decay, max_grad_norm, self.masks, self._refresh,
            self.options.get("refresh_interval", 100),
        )

    def deltas(self, model: nn.Module) -> dict[str, SparseDelta]:
        out = {}
        for name, p in self.weights.items():
            idx, base = self.seen[p]
            change = torch.zeros(p.numel())
            change[idx.cpu()] = (p.detach().view(-1)[idx].float() - base.float()).cpu()
            mask = torch.zeros(p.numel(), dtype=torch.bool).index_fill_(0, idx.cpu(), True)
            out[name] = SparseDelta.from_dense(change.view(p.shape), mask.view(p.shape))
        return out

    def record(self) -> dict:
        return {"entries_per_matrix": {n: int(self.masks[p].numel()) for n, p in self.weights.items()},
                "lora_rank": self.lora_rank, "filter_rank": self.filter_rank}
