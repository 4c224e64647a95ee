"""Our own methods (HFT, LIFT, SORSA, LoLDU, KaSA): trainable counts equal the formulas, outputs at
init, one training step changes only what the method trains (masks checked entry by entry), and
the saved delta applied to the base gives the unmerged model's logits."""

from __future__ import annotations

import pytest
import torch
from adapt_util import base_model, batch_of, logits, one_step, tiny_lm, train_cfg  # noqa: F401
from transformers import set_seed

from deltawise.adapt import get_method, run_train
from deltawise.delta.apply import apply_to_model
from deltawise.delta.store import DeltaFile

TARGETS = ["q_proj", "v_proj"]
R = 4
# each method's own parameters (hft takes only ``ratio``; lift trains every linear, so it takes no targets)
ADAPTER = {"rank": R, "targets": TARGETS}
PARAMS = {"sorsa": ADAPTER, "loldu": ADAPTER, "kasa": ADAPTER, "hft": {},
          "lift": {"rank": R, "filter_rank": 4, "refresh_interval": 2}}


def _linears(model, targets=TARGETS):
    return {f"{n}.weight": m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (targets is None or n.split(".")[-1] in targets) and not n.endswith("lm_head")}


def _expected_mask(w: torch.Tensor, filter_rank: int, lora_rank: int) -> torch.Tensor:
    """LIFT's mask written independently: threshold at the k-th largest |rank-r_f approximation|."""
    m, n = w.shape
    k = min((m + n) * lora_rank, m * n)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    approx = (u[:, :filter_rank] @ torch.diag(s[:filter_rank]) @ vh[:filter_rank]).abs().flatten()
    thresh = approx.sort(descending=True).values[k - 1]
    return approx >= thresh


@pytest.mark.parametrize("method", ["sorsa", "loldu", "kasa"])
def test_trainable_count_formula(method, tiny_lm):
    base = base_model(tiny_lm["model"])
    shapes = [tuple(w.shape) for w in _linears(base).values()]  # (out, in)
    model = get_method(method, ADAPTER).prepare(base, "causal_lm", 0)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    formula = {"sorsa": lambda o, i: R * (o + i) + R, "loldu": lambda o, i: R, "kasa": lambda o, i: R * (i + o) + R}[method]
    assert n == sum(formula(o, i) for o, i in shapes)


def test_lift_trainable_count_is_lora_budget(tiny_lm):
    base = base_model(tiny_lm["model"])
    shapes = [tuple(w.shape) for w in _linears(base, None).values()]
    total = sum(p.numel() for p in base.parameters())
    method = get_method("lift", {"rank": 2, "filter_rank": 4})
    model = method.prepare(base, "causal_lm", 0)
    assert method.count_params(model) == (sum(min((o + i) * 2, o * i) for o, i in shapes), total)


def test_hft_selects_half_per_category(tiny_lm):
    from deltawise.adapt.methods.hft import select_half

    base = base_model(tiny_lm["model"])
    chosen = select_half(base, 0.5, seed=3)
    for layer in (0, 1):
        names = [c for c in chosen if f"layers.{layer}." in c]
        attn = [c for c in names if "self_attn" in c]
        ffn = [c for c in names if ".mlp." in c]
        norms = [c for c in names if "norm" in c]
        assert len(attn) == 2 and len(norms) == 1
        assert len(ffn) == (1 if layer == 0 else 2)  # 3 FFN matrices: 1 and 2 alternate, half on average
    assert not any("embed" in c or "lm_head" in c for c in chosen)
    assert select_half(base, 0.5, seed=3) == chosen and select_half(base, 0.5, seed=4) != chosen


@pytest.mark.parametrize("method", ["sorsa", "loldu"])
def test_output_equals_base_at_init(method, tiny_lm):
    batch = batch_of(tiny_lm)
    expected = logits(base_model(tiny_lm["model"]), batch)
    model = get_method(method, ADAPTER).prepare(base_model(tiny_lm["model"]), "causal_lm", 0)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=1e-4)


def test_kasa_init_equals_truncated_base(tiny_lm):
    """KaSA changes the output at step 0 by design: it equals the base with the r smallest singular
    components of every target removed (ΔW = 0 because B = 0)."""
    batch = batch_of(tiny_lm)
    truncated = base_model(tiny_lm["model"])
    with torch.no_grad():
        for name, w in _linears(truncated).items():
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            s[-R:] = 0
            truncated.get_parameter(name).copy_((u * s) @ vh)
    model = get_method("kasa", ADAPTER).prepare(base_model(tiny_lm["model"]), "causal_lm", 0)
    got = logits(model, batch)
    torch.testing.assert_close(got, logits(truncated, batch), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, logits(base_model(tiny_lm["model"]), batch), atol=1e-6)


@pytest.mark.parametrize("method", ["sorsa", "loldu", "kasa", "hft", "lift"])
def test_merged_delta_equals_unmerged_model(method, tiny_lm, tmp_path):
    batch = batch_of(tiny_lm)
    set_seed(0)
    m = get_method(method, PARAMS[method])
    model = m.prepare(base_model(tiny_lm["model"]), "causal_lm", 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for _ in range(3):  # three steps, so LIFT refreshes its mask once
        one_step(model, batch, params, 1e-2, opt)
        m.after_optimizer_step(model, opt)
        if method == "sorsa":
            m.before_optimizer_step(model, 1e-2)
    unmerged = logits(model, batch)
    m.save(model, tmp_path / "delta")
    merged = apply_to_model(base_model(tiny_lm["model"]), tmp_path / "delta")
    assert not torch.allclose(unmerged, logits(base_model(tiny_lm["model"]), batch), atol=1e-4)
    torch.testing.assert_close(logits(merged, batch), unmerged, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["sorsa", "loldu", "kasa"])
def test_one_step_changes_only_target_weights(method, tiny_lm, tmp_path):
    result = run_train(train_cfg(tiny_lm, tmp_path / "o", method, ADAPTER))
    base = base_model(tiny_lm["model"]).state_dict()
    new = apply_to_model(base_model(tiny_lm["model"]), result.output).state_dict()
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert changed == set(_linears(base_model(tiny_lm["model"])))
    assert {DeltaFile(result.output).kind(k) for k in changed} == {"lowrank"}


def test_hft_one_step_changes_exactly_the_selection(tiny_lm, tmp_path):
    import json

    result = run_train(train_cfg(tiny_lm, tmp_path / "o", "hft", seed=5))
    record = json.loads((result.output / "deltawise_train.json").read_text())["method_record"]
    base = base_model(tiny_lm["model"]).state_dict()
    new = apply_to_model(base_model(tiny_lm["model"]), result.output).state_dict()
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert changed == set(record["selected"])
    assert {DeltaFile(result.output).kind(k) for k in changed} == {"dense"}
    from deltawise.adapt.methods.hft import select_half

    assert record["selected"] == select_half(base_model(tiny_lm["model"]), 0.5, seed=5)
    assert result.trainable_params == sum(base[k].numel() for k in record["selected"])


def test_lift_one_step_changes_only_principal_entries(tiny_lm, tmp_path):
    result = run_train(train_cfg(tiny_lm, tmp_path / "o", "lift", {"rank": 2, "filter_rank": 4}))
    base_model_ = base_model(tiny_lm["model"])
    base = base_model_.state_dict()
    new = apply_to_model(base_model(tiny_lm["model"]), result.output).state_dict()
    linears = _linears(base_model_, None)
    delta = DeltaFile(result.output)
    for k in base:
        if k not in linears:
            assert torch.equal(base[k], new[k]), k  # norms, embeddings, LM head frozen
            continue
        mask = _expected_mask(base[k], 4, 2)
        changed = (base[k] != new[k]).flatten()
        assert not changed[~mask].any(), f"{k}: entries outside the principal mask changed"
        assert changed[mask].float().mean() > 0.9, f"{k}: masked entries did not train"
        assert delta.kind(k) == "sparse" and torch.equal(delta.get(k).mask().flatten(), mask)


def test_lift_adamw_on_values_equals_dense_adamw_on_masked_gradient(tiny_lm):
    """Without clipping, weight decay or refresh, AdamW on LIFT's masked values equals torch AdamW on
    the whole weights fed the masked gradient (Adam's update is exactly 0 where the gradient has
    always been 0), so the masked-gradient autograd function gives W's true gradient at the mask."""
    batch = batch_of(tiny_lm)
    m = get_method("lift", {"rank": 2, "filter_rank": 4, "refresh_interval": 0})
    ours = m.prepare(base_model(tiny_lm["model"]), "causal_lm", 0)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0, eps=1e-8)
    ref = base_model(tiny_lm["model"])
    masks = {f"{n}.weight": torch.zeros(mod.weight.numel(), dtype=torch.bool).index_fill_(0, mod.mask, True).view_as(mod.weight)
             for n, mod in m.modules.items()}
    assert masks and all(torch.equal(mk.flatten(), _expected_mask(ref.get_parameter(n).detach(), 4, 2))
                         for n, mk in masks.items())
    ref_params = {n: ref.get_parameter(n) for n in masks}
    for p in ref.parameters():
        p.requires_grad_(False)
    for p in ref_params.values():
        p.requires_grad_(True)
    ref_opt = torch.optim.AdamW(list(ref_params.values()), lr=1e-3, weight_decay=0.0, eps=1e-8)
    for _ in range(3):
        ours.train(); ref.train()
        ours(**batch).loss.backward(); opt.step(); m.after_optimizer_step(ours, opt); opt.zero_grad()
        ref(**batch).loss.backward()
        for n, p in ref_params.items():
            p.grad *= masks[n]
        ref_opt.step(); ref_opt.zero_grad()
    for n, p in ref_params.items():
        torch.testing.assert_close(ours.get_parameter(n), p, atol=1e-6, rtol=1e-5)


def test_lift_refresh_keeps_moments_of_kept_entries(tiny_lm):
    """On a mask refresh, Adam moments follow their entries: kept entries keep theirs, new ones start at 0."""
    batch = batch_of(tiny_lm)
    m = get_method("lift", {"rank": 2, "filter_rank": 4, "refresh_interval": 1})
    model = m.prepare(base_model(tiny_lm["model"]), "causal_lm", 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)  # big steps move the masks
    mod = m.modules["model.layers.0.self_attn.q_proj"]
    old_mask = mod.mask.clone()
    model(**batch).loss.backward()
    opt.step()
    old = {k: torch.zeros(mod.weight.numel()).index_put_((old_mask,), opt.state[mod.values][k].clone())
           for k in ("exp_avg", "exp_avg_sq")}
    m.after_optimizer_step(model, opt)  # refresh
    assert torch.equal(mod.mask, _expected_mask(mod.weight.detach(), 4, 2).nonzero().flatten())
    assert not torch.equal(mod.mask, old_mask), "the big step should have moved the mask"
    kept = torch.isin(mod.mask, old_mask)
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[mod.values][k][kept], old[k][mod.mask[kept]])
        assert not opt.state[mod.values][k][~kept].any()
    assert torch.equal(mod.values.detach(), mod.weight.detach().view(-1)[mod.mask])


@pytest.mark.parametrize("method", ["lift", "kasa"])
def test_classification_head_trains_and_is_saved_whole(method, tiny_lm, tmp_path):
    params = {"rank": 2, "filter_rank": 4} if method == "lift" else {"rank": 2, "targets": TARGETS}
    cfg = train_cfg(tiny_lm, tmp_path / "o", method, params, task="classification", data=tiny_lm["cls"])
    result = run_train(cfg)
    saved = DeltaFile(result.output).get("score.weight")
    head = base_model(tiny_lm["model"], "classification", 2)
    assert saved.kind == "full"  # stored whole, taken as is
    assert not torch.equal(saved.values, head.score.weight.detach())  # a step moved it
    merged = apply_to_model(head, result.output)
    assert torch.equal(merged.score.weight.detach(), saved.values)


def test_sorsa_adds_scaled_orthonormal_gradient_after_clipping(tiny_lm):
    m = get_method("sorsa", {"rank": R, "targets": TARGETS, "gamma": 0.5})
    model = m.prepare(base_model(tiny_lm["model"]), "causal_lm", 0)
    with torch.no_grad():  # move away from orthonormal so the norm is differentiable and non-zero
        for mod in m.modules.values():
            mod.U.mul_(1.1)
            mod.Vh.mul_(0.9)
    mods = list(m.modules.values())
    # independent formula: L_o = (1/N_mat) Σ (‖VVᵀ−I‖_F + ‖UᵀU−I‖_F), N_mat = 2·layers
    loss = sum(torch.sqrt(((x.Vh @ x.Vh.T - torch.eye(R)) ** 2).sum()) + torch.sqrt(((x.U.T @ x.U - torch.eye(R)) ** 2).sum())
               for x in mods) / (2 * len(mods))
    expected = torch.autograd.grad(0.5 / 1e-3 * loss, [mods[0].U, mods[0].Vh])
    m.before_optimizer_step(model, 1e-3)
    torch.testing.assert_close(mods[0].U.grad, expected[0])
    torch.testing.assert_close(mods[0].Vh.grad, expected[1])
    assert mods[0].S.grad is None or torch.count_nonzero(mods[0].S.grad) == 0
