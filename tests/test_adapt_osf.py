"""OSF through ``train -m osf`` (Nayak et al. 2025, arXiv 2504.07097): the same update as PEFT's OSF used
directly, saved as a deltawise delta; the trainable count is the formula; the model equals the base at
init; and the update stays mostly out of each matrix's preserved top singular subspace, unlike full
fine-tuning's."""

from __future__ import annotations

import pytest
import torch
from adapt_util import base_model, batch_of, logits, one_step, tiny_lm, train_cfg  # noqa: F401
from transformers import set_seed

from deltawise.adapt import MethodError, get_method, run_train
from deltawise.delta.source import open_delta

TARGETS = ["q_proj", "v_proj"]


def _preserved_share(delta: torch.Tensor, w0: torch.Tensor, share: float = 0.5) -> float:
    """‖U_hᵀ ΔW‖ / ‖ΔW‖ with U_h the top ``share`` of W0's left singular vectors."""
    u = torch.linalg.svd(w0.double())[0]
    k = int(share * min(w0.shape))
    return float((u[:, :k].T @ delta.double()).norm() / delta.double().norm())


def test_osf_trains_what_peft_trains_and_saves_it_as_a_delta(tiny_lm, tmp_path):
    from peft import OSFConfig, get_peft_model

    result = run_train(train_cfg(tiny_lm, tmp_path / "osf", "osf", {"targets": TARGETS}))
    set_seed(0)
    ref = get_peft_model(base_model(tiny_lm["model"]), OSFConfig(effective_rank=0.5, target_modules=TARGETS))
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    # per matrix (in + out + 1)·(min(in, out) − k): q 32→32 (k 16), v 32→16 (k 8), two layers
    assert result.trainable_params == n_ref == 2 * ((32 + 32 + 1) * 16 + (32 + 16 + 1) * 8)
    one_step(ref, batch_of(tiny_lm), [p for p in ref.parameters() if p.requires_grad], 1e-2)
    expected = {name.removeprefix("base_model.model.") + ".weight": m.get_delta_weight("default").detach()
                for name, m in ref.named_modules() if hasattr(m, "osf_svd_params") and "default" in m.osf_svd_params}
    source = open_delta(tmp_path / "osf")
    assert sorted(source.names()) == sorted(expected) and len(expected) == 4
    for name, delta in expected.items():
        assert delta.abs().max() > 0
        atol = 1e-4 if torch.cuda.is_available() else 2e-6
        torch.testing.assert_close(source.get(name).materialize(), delta, atol=atol, rtol=1e-4)


def test_osf_equals_the_base_at_init(tiny_lm):
    batch = batch_of(tiny_lm)
    model = get_method("osf", {"targets": TARGETS}).prepare(base_model(tiny_lm["model"]), "causal_lm", 0)
    torch.testing.assert_close(logits(model, batch), logits(base_model(tiny_lm["model"]), batch), atol=1e-5, rtol=1e-4)


def test_the_update_mostly_avoids_the_preserved_subspace(tiny_lm, tmp_path):
    run_train(train_cfg(tiny_lm, tmp_path / "osf", "osf", {"targets": TARGETS}, max_steps=3, lr=1e-3))
    run_train(train_cfg(tiny_lm, tmp_path / "full", "full", {}, max_steps=3, lr=1e-3))
    w0 = dict(base_model(tiny_lm["model"]).named_parameters())
    full = dict(base_model(tmp_path / "full").named_parameters())
    source = open_delta(tmp_path / "osf")
    for name in source.names():
        osf_share = _preserved_share(source.get(name).materialize(), w0[name].detach())
        full_share = _preserved_share((full[name] - w0[name]).detach(), w0[name].detach())
        # not exactly 0: Adam rescales the projected gradient elementwise, which leaks a little into the subspace
        assert osf_share < 0.25 < full_share, (name, osf_share, full_share)


def test_osf_refuses_a_classifier(tiny_lm):
    with pytest.raises(MethodError, match="causal language models"):
        get_method("osf").prepare(base_model(tiny_lm["model"]), "classification", 0)
    with pytest.raises(MethodError, match="preserved"):
        get_method("osf", {"preserved": 1.0})
