"""The streaming engine: chunking and threads never change results; tensor bookkeeping rules."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_state
from deltawise.errors import RecipeError
from deltawise.merge import merge
from deltawise.merge import engine as engine_module


def recipe_for(method, family, params=None, models=("ft1", "ft2", "ft3"), base=True, **extra):
    r = {"merge_method": method, "models": [{"model": str(family[m])} for m in models], "parameters": params or {}}
    if base:
        r["base_model"] = str(family["base"])
    r.update(extra)
    return r


def assert_same_files(a, b):
    sa, sb = load_state(a), load_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"weight": 0.4}),
    ("ties", {"density": 0.3, "granularity": "global"}),
    ("breadcrumbs", {"density": 0.3, "granularity": "row"}),
    ("dare_ties", {"density": 0.5}),
    ("linear", {}),
])
def test_chunked_and_threaded_runs_match_whole_tensor_runs(llama_family, tmp_path, monkeypatch, method, params):
    r = recipe_for(method, llama_family, params, base=method != "linear")
    merge(r, str(tmp_path / "whole"), threads=1)
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 100)  # forces many row chunks per matrix
    merge(r, str(tmp_path / "chunked"), threads=4)
    assert_same_files(tmp_path / "whole", tmp_path / "chunked")


def test_dare_is_reproducible_and_seed_dependent(llama_family, tmp_path):
    r = recipe_for("dare_linear", llama_family, {"density": 0.3}, seed=11)
    merge(r, str(tmp_path / "a"), threads=1)
    merge(r, str(tmp_path / "b"), threads=3)
    assert_same_files(tmp_path / "a", tmp_path / "b")
    merge(dict(r, seed=12), str(tmp_path / "c"))
    a, c = load_state(tmp_path / "a"), load_state(tmp_path / "c")
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_single_model_merges_return_that_model(llama_family, tmp_path):
    ft1 = load_state(llama_family["ft1"])
    for method in ("linear", "task_arithmetic", "ties", "dare_linear", "breadcrumbs"):
        params = {"density": 1.0} if method in ("ties", "dare_linear", "breadcrumbs") else {}
        merge(recipe_for(method, llama_family, params, models=("ft1",), base=method != "linear"), str(tmp_path / method))
        out = load_state(tmp_path / method)
        for k, v in ft1.items():
            assert torch.allclose(out[k], v, atol=1e-6), (method, k)


def test_task_arithmetic_lambda_zero_returns_base_bit_exactly(llama_family, tmp_path):
    merge(recipe_for("task_arithmetic", llama_family, {"lambda": 0.0}), str(tmp_path / "out"))
    assert_same_files(tmp_path / "out", llama_family["base"])


def test_linear_on_identical_models_is_identity(llama_family, tmp_path):
    r = {"merge_method": "linear", "models": [
        {"model": str(llama_family["ft1"]), "parameters": {"weight": w}} for w in (0.25,)
    ] + [{"model": str(tmp_path / "copy"), "parameters": {"weight": 0.75}}]}
    import shutil

    shutil.copytree(llama_family["ft1"], tmp_path / "copy")
    merge(r, str(tmp_path / "out"))
    for k, v in load_state(llama_family["ft1"]).items():
        assert torch.allclose(load_state(tmp_path / "out")[k], v, atol=1e-6)


def test_output_dtype_exclude_and_integer_buffers(make_folder, tmp_path):
    base = {"w": torch.randn(4, 4), "head.weight": torch.randn(2, 4), "position_ids": torch.arange(4)}
    ft = {"w": base["w"] + 1, "head.weight": base["head.weight"] + 1, "position_ids": torch.arange(4) + 7}
    b, f = make_folder("base", base), make_folder("ft", ft)
    r = {"merge_method": "task_arithmetic", "base_model": str(b), "models": [{"model": str(f), "parameters": {"weight": 0.5}}],
         "dtype": "bfloat16", "exclude": ["^head\\."]}
    merge(r, str(tmp_path / "out"))
    out = load_state(tmp_path / "out")
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], (base["w"] + 0.5).to(torch.bfloat16))
    assert torch.equal(out["head.weight"], base["head.weight"].to(torch.bfloat16))  # excluded: copied from base
    assert torch.equal(out["position_ids"], base["position_ids"])  # integer buffer: copied from base


def test_tied_input_embedding_stands_in_for_missing_lm_head(make_folder, tmp_path):
    emb = torch.randn(10, 4)
    base = make_folder("base", {"model.embed_tokens.weight": emb, "lm_head.weight": emb + 1}, {"tie_word_embeddings": False})
    tied = make_folder("tied", {"model.embed_tokens.weight": emb + 2}, {"tie_word_embeddings": True})
    r = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(tied)}]}
    merge(r, str(tmp_path / "out"))
    out = load_state(tmp_path / "out")
    # the tied model's lm_head is its embedding (emb + 2): delta vs base lm_head (emb + 1) is +1
    assert torch.allclose(out["lm_head.weight"], emb + 2)
    untied = make_folder("untied", {"model.embed_tokens.weight": emb}, {"tie_word_embeddings": False})
    with pytest.raises(RecipeError, match="lm_head.weight"):
        merge(dict(r, models=[{"model": str(untied)}]), str(tmp_path / "out2"))


def test_larger_vocabulary_is_cut_to_the_base_with_a_warning(make_folder, tmp_path):
    base = make_folder("base", {"model.embed_tokens.weight": torch.zeros(6, 3), "w": torch.zeros(3)}, {"vocab_size": 6})
    big = make_folder("big", {"model.embed_tokens.weight": torch.ones(8, 3), "w": torch.ones(3)}, {"vocab_size": 8})
    r = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(big)}]}
    from deltawise.merge import build_plan, parse_recipe

    plan = build_plan(parse_recipe(r))
    assert any("larger vocabulary" in w for w in plan.warnings)
    merge(r, str(tmp_path / "out"))
    assert torch.equal(load_state(tmp_path / "out")["model.embed_tokens.weight"], torch.ones(6, 3))
    with pytest.raises(RecipeError, match="vocabulary rows"):
        merge(dict(r, base_model=str(big), models=[{"model": str(base)}]), str(tmp_path / "out2"))


def test_gradient_and_filter_parameters_reach_each_tensor(llama_family):
    from deltawise.merge import build_plan, parse_recipe

    r = recipe_for("ties", llama_family, {
        "density": [0.2, 0.8],
        "weight": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}],
    })
    plan = {t.name: t for t in build_plan(parse_recipe(r)).merged}
    assert plan["model.layers.0.mlp.up_proj.weight"].model_params[0] == {"weight": 1.0, "density": 0.2}
    assert plan["model.layers.1.self_attn.q_proj.weight"].model_params[0] == {"weight": 0.5, "density": 0.8}
    assert plan["model.norm.weight"].model_params[0]["density"] == 0.2  # outside the layer stack: t = 0


def test_bert_merge_loads_in_transformers_and_runs(bert_family, tmp_path):
    from transformers import AutoModel

    r = recipe_for("ties", bert_family, {"density": 0.5}, models=("ft1", "ft2"))
    merge(r, str(tmp_path / "out"))
    model = AutoModel.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([[1, 5, 7, 2]])).last_hidden_state
    assert hidden.shape == (1, 4, 32) and bool(torch.isfinite(hidden).all())
    manifest = json.loads((tmp_path / "out" / "deltawise_merge.json").read_text())
    assert manifest["recipe"]["merge_method"] == "ties" and len(manifest["inputs"]) == 3


def test_llama_merge_forward_matches_direct_state_dict_arithmetic(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    merge(recipe_for("task_arithmetic", llama_family, {"weight": 1 / 3}), str(tmp_path / "out"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base, fts = load_state(llama_family["base"]), [load_state(llama_family[f"ft{i}"]) for i in (1, 2, 3)]
    expected = {k: v + sum(ft[k] - v for ft in fts) / 3 for k, v in base.items()}
    reference = AutoModelForCausalLM.from_pretrained(llama_family["base"])
    reference.load_state_dict(expected, strict=False)
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-5)


def test_cuda_request_without_gpu_is_a_clear_error(llama_family, tmp_path):
    from deltawise.errors import DeltawiseError

    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the CUDA path is exercised on the device machine instead")
    with pytest.raises(DeltawiseError, match="no CUDA device"):
        merge(recipe_for("linear", llama_family, base=False), str(tmp_path / "out"), device="cuda")
    assert not (tmp_path / "out").exists()


def test_output_inside_an_input_folder_is_refused(make_folder):
    from deltawise.errors import OutputError
    from conftest import tree_digest

    base = make_folder("base", {"w": torch.zeros(3)})
    ft = make_folder("ft", {"w": torch.ones(3)})
    before = tree_digest(ft)
    r = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(ft)}]}
    with pytest.raises(OutputError, match="inside the folder of input"):
        merge(r, str(ft / "merged"))
    assert tree_digest(ft) == before and not (ft / "merged").exists()


def test_nan_in_a_copied_tensor_is_refused(make_folder, tmp_path):
    from deltawise.errors import InputError

    base = make_folder("base", {"w": torch.zeros(3), "head.weight": torch.tensor([1.0, float("nan")])})
    ft = make_folder("ft", {"w": torch.ones(3), "head.weight": torch.ones(2)})
    r = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(ft)}], "exclude": ["^head"]}
    with pytest.raises(InputError, match="head.weight"):
        merge(r, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_methods_checked_only_on_their_result_turn_any_non_finite_input_non_finite(method):
    """The engine screens inputs of these methods only through their result (propagates_nonfinite):
    every NaN/inf input entry must make its output entry non-finite, whatever the weights
    (0 included: 0 * inf is NaN), lambda or normalize, and cancelling infinities too."""
    from deltawise.merge.base import REGISTRY, merge_tensor

    impl = REGISTRY[method]()
    assert impl.propagates_nonfinite
    gen = torch.Generator().manual_seed(0)
    specials = [float("nan"), float("inf"), float("-inf")]
    for trial in range(40):
        shape = (6, 5)
        base = torch.randn(shape, generator=gen)
        models = [torch.randn(shape, generator=gen) for _ in range(3)]
        inputs = [base, *models] if method == "task_arithmetic" else models
        where = torch.rand(shape, generator=gen) < 0.3
        for k, x in enumerate(inputs):  # every input gets some specials; some entries get two
            mask = where & (torch.rand(shape, generator=gen) < 0.5)
            x[mask] = specials[(trial + k) % 3]
        poisoned = torch.zeros(shape, dtype=torch.bool)
        for x in inputs:
            poisoned |= ~torch.isfinite(x)
        weights = [[0.0, 1.0, -2.0], [0.5, 0.5, 0.5], [1.0, 0.0, 0.0]][trial % 3]
        params = {"normalize": trial % 2 == 0, "lambda": [1.0, 0.0, -0.7][trial % 3]}
        result = merge_tensor(impl, base if method == "task_arithmetic" else None, models, params,
                              [{"weight": w} for w in weights])
        assert poisoned.any()
        assert not torch.isfinite(result[poisoned]).any(), (trial, weights, params)
        assert torch.isfinite(result[~poisoned]).all()


def test_a_non_finite_input_with_weight_zero_is_still_reported_as_an_input_error(make_folder, tmp_path):
    from deltawise.errors import InputError

    bad = torch.ones(4, 3)
    bad[2, 1] = float("inf")
    a = make_folder("a", {"w": torch.ones(4, 3)})
    b = make_folder("b", {"w": bad})
    r = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                               {"model": str(b), "parameters": {"weight": 0.0}}]}
    with pytest.raises(InputError, match=r"model '.*b'.*'w' contains NaN or infinite"):
        merge(r, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_cpu_merge_never_touches_cuda(llama_family, tmp_path, monkeypatch):
    """Pinned buffers and device copies belong to --device cuda only: on the CPU nothing may
    initialise CUDA (it would fail, or grab a GPU, on machines that have one)."""
    def refuse(*args, **kwargs):
        raise AssertionError("CUDA was touched by a CPU merge")

    monkeypatch.setattr(torch.cuda, "_lazy_init", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", refuse)
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 100)
    for method, params in (("linear", {}), ("task_arithmetic", {"weight": 0.5}), ("ties", {"density": 0.5})):
        merge(recipe_for(method, llama_family, params, base=method != "linear"), str(tmp_path / method), threads=2)
        assert (tmp_path / method / "deltawise_merge.json").exists()


def test_a_model_listed_three_times_is_reported_once_per_repeat(llama_family, tmp_path):
    r = recipe_for("linear", llama_family, models=("ft1", "ft2", "ft1", "ft1"), base=False)
    with pytest.raises(RecipeError) as info:
        merge(r, str(tmp_path / "out"))
    lines = [line for line in str(info.value).splitlines() if "same model" in line]
    assert lines == [f"  - models[{i}] ({llama_family['ft1']}) is the same model as models[0]" for i in (2, 3)], str(info.value)


# ---- which tensor a free worker takes (engine._shard_ordered_map) ------------------------------------


def _simulate_schedule(monkeypatch, shards: dict[str, list[int]], limit: int, finish_order: list[str]):
    """Run the scheduler with a pool that only records submissions and a ``wait`` that finishes the
    running tensors in ``finish_order``; returns the tensor names in submission order."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    tensors, shard_of = [], {}
    for shard, sizes in shards.items():
        for i, size in enumerate(sizes):
            name = f"{shard}{i}"
            tensors.append(SimpleNamespace(name=name, out=SimpleNamespace(nbytes=size)))
            shard_of[name] = shard
    submitted: list[str] = []
    running: dict[str, Future] = {}

    class Pool:
        def submit(self, fn, t):
            submitted.append(t.name)
            f = running[t.name] = Future()
            return f

    order = iter(finish_order)

    def wait(futures, return_when):
        name = next(order)
        assert running[name] in futures, f"{name} finished while not running (running: {sorted(running)})"
        f = running.pop(name)
        f.set_result(name)
        return {f}, set(futures) - {f}

    monkeypatch.setattr(engine_module, "wait", wait)
    done = list(engine_module._shard_ordered_map(Pool(), None, tensors, shard_of, limit))
    assert sorted(done) == sorted(t.name for t in tensors)  # each tensor exactly once
    return submitted


def test_a_free_worker_takes_a_shard_nobody_writes(monkeypatch):
    """Hand-traced: two workers over shards A (3 tensors), B (1) and C (2) never share a shard, and
    each shard's tensors go in file order, so every chunk is hashed from memory."""
    submitted = _simulate_schedule(monkeypatch, {"A": [10, 10, 10], "B": [5], "C": [7, 7]}, limit=2,
                                   finish_order=["B0", "A0", "C0", "A1", "C1", "A2"])
    assert submitted == ["A0", "B0", "C0", "A1", "C1", "A2"]


def test_with_every_shard_taken_a_worker_joins_the_one_with_most_left(monkeypatch):
    """Three workers, two shards: the third joins A (30 bytes left against B's none), in order."""
    submitted = _simulate_schedule(monkeypatch, {"A": [10, 10, 10], "B": [5]}, limit=3,
                                   finish_order=["A0", "B0", "A1", "A2"])
    assert submitted == ["A0", "B0", "A1", "A2"]
    submitted = _simulate_schedule(monkeypatch, {"A": [1, 1], "B": [9, 9], "C": [4]}, limit=4,
                                   finish_order=["A0", "B0", "C0", "A1", "B1"])
    assert submitted[:3] == ["A0", "B0", "C0"] and submitted[3] == "B1"  # B has 9 left, A 1


def test_schedule_property_order_within_a_shard_and_at_most_limit_running(monkeypatch):
    """Random shard sizes, limits and finishing orders: within a shard tensors start in file order,
    never more than ``limit`` run, and a second worker enters a shard only when every shard with work
    left already has one."""
    import random
    from concurrent.futures import Future
    from types import SimpleNamespace

    rng = random.Random(0)
    for trial in range(200):
        shards = {f"S{k}": [rng.randint(1, 9) for _ in range(rng.randint(1, 4))] for k in range(rng.randint(1, 4))}
        limit = rng.randint(1, 4)
        shard_of = {f"{s}{i}": s for s, sizes in shards.items() for i in range(len(sizes))}
        running: list[str] = []
        started = {s: 0 for s in shards}  # tensors of each shard submitted so far

        class Pool:
            def submit(self, fn, t):
                shard = shard_of[t.name]
                free = [s for s in shards if started[s] < len(shards[s]) and all(shard_of[n] != s for n in running)]
                assert len(running) < limit and (not free or shard in free), (trial, t.name, free)
                assert t.name == f"{shard}{started[shard]}"  # file order within the shard
                started[shard] += 1
                running.append(t.name)
                f = Future()
                f.name = t.name
                return f

        def wait(futures, return_when):
            f = rng.choice(sorted(futures, key=lambda f: f.name))  # any running tensor may finish first
            running.remove(f.name)
            f.set_result(f.name)
            return {f}, set(futures) - {f}

        tensors = [SimpleNamespace(name=f"{s}{i}", out=SimpleNamespace(nbytes=size))
                   for s, sizes in shards.items() for i, size in enumerate(sizes)]
        monkeypatch.setattr(engine_module, "wait", wait)
        assert sorted(engine_module._shard_ordered_map(Pool(), None, tensors, shard_of, limit)) == sorted(shard_of)


def test_a_failing_tensor_stops_the_schedule_and_cancels_the_rest(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    tensors = [SimpleNamespace(name=f"t{i}", out=SimpleNamespace(nbytes=1)) for i in range(6)]

    def fn(t):
        if t.name == "t1":
            raise ValueError("bad tensor t1")
        return t.name

    with ThreadPoolExecutor(2) as pool, pytest.raises(ValueError, match="bad tensor t1"):
        list(engine_module._shard_ordered_map(pool, fn, tensors, {t.name: t.name[-1] for t in tensors}, 2))
