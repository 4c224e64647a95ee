"""Training-step speed of our own adapters against PEFT LoRA, in one process, methods taking turns.

What it measures
    One random Llama (``tests/tiny_models.py`` shape: hidden 256, 4 layers, vocabulary 2000 by default), one copy per
    method prepared by the method itself (``get_method(name).prepare``), AdamW over the trainable parameters, and
    one training step as the Trainer runs it: forward with labels, the method's ``regularizer``, backward,
    ``clip_grad_norm_``, ``before_optimizer_step``, ``optimizer.step``, ``after_optimizer_step``. The methods take
    turns round by round (so a change in the machine's load hits all of them alike); it prints each method's
    median and fastest step as tokens/s and their ratio to the LoRA of the same targets (same trainable budget).

    ``train_speed.py`` times whole ``deltawise train`` processes instead (set-up, data, saving); on a shared
    machine its single runs vary too much to compare methods within 10%.

How to run it (from the repository root)
    PYTHONPATH=src .venv/bin/python benchmarks/train_step_speed.py --rounds 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

# (method, its parameters, the LoRA it is compared with): SORSA, KaSA and LoLDU adapt PEFT's default targets
# (Llama: q_proj, v_proj) as LoRA does; LIFT trains (in + out)·rank entries of every linear, a LoRA's budget on
# all of them; HFT trains half of each layer's matrices and has no LoRA of the same budget (compared with LoRA).
ALL_LINEARS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
CASES = {
    "lora": ("lora", {}, None),
    "lora_all": ("lora", {"targets": ALL_LINEARS.split(",")}, None),
    "sorsa": ("sorsa", {}, "lora"),
    "kasa": ("kasa", {}, "lora"),
    "loldu": ("loldu", {}, "lora"),
    "lift": ("lift", {"refresh_interval": 0}, "lora_all"),
    "hft": ("hft", {}, "lora"),
}


def make_model(hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def make_step(base, name: str, params: dict, lr: float = 1e-4):
    from deltawise.adapt.methods import get_method

    method = get_method(name, {"rank": 8, **params} if name != "hft" else params)
    model = method.prepare(copy.deepcopy(base), "causal_lm", 0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)

    def step(ids: torch.Tensor) -> None:
        loss = model(input_ids=ids, labels=ids).loss
        reg = method.regularizer(model)
        if reg is not None:
            loss = loss + reg
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        method.before_optimizer_step(model, lr)
        optimizer.step()
        method.after_optimizer_step(model, optimizer)
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in trainable)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(CASES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = make_model(args.hidden, args.layers, args.vocab)
    names = args.methods.split(",")
    steps, budgets = {}, {}
    for case in names:
        method, params, _ = CASES[case]
        steps[case], budgets[case] = make_step(base, method, params)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.length), generator=torch.Generator().manual_seed(0))
    for case in names:  # warm-up: allocations, first AdamW state
        steps[case](ids)
    times: dict[str, list[float]] = {case: [] for case in names}
    for _ in range(args.rounds):
        for case in names:
            t0 = time.perf_counter()
            steps[case](ids)
            times[case].append(time.perf_counter() - t0)
    tokens = args.batch_size * args.length
    print(f"random Llama hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}; batch {args.batch_size} x "
          f"{args.length} tokens; {args.rounds} rounds; torch threads {args.threads}")
    print(f"{'method':<9} {'trainable':>10} {'median tok/s':>13} {'best tok/s':>11} {'vs':>9} {'median ratio':>13} "
          f"{'best ratio':>11}")
    for case in names:
        med, best = tokens / statistics.median(times[case]), tokens / min(times[case])
        ref = CASES[case][2]
        if ref in times:
            r_med = statistics.median(times[ref]) / statistics.median(times[case])
            r_best = min(times[ref]) / min(times[case])
            tail = f"{ref:>9} {r_med:>13.2f} {r_best:>11.2f}"
        else:
            tail = ""
        print(f"{case:<9} {budgets[case]:>10,} {med:>13.0f} {best:>11.0f} {tail}")


if __name__ == "__main__":
    main()
