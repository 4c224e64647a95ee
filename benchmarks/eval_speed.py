"""Speed of ``deltawise eval`` perplexity on CPU at several batch sizes.

What it measures
    Token-weighted perplexity of a causal LM on the first ``--texts`` documents of a text file
    (documents separated by blank lines or ``%`` lines, as ``deltawise eval`` reads them),
    once per batch size (default 1, 8, 16), after one warm-up batch. It prints seconds,
    predicted tokens and tokens/s per batch size, and checks that every batch size gives the
    same perplexity (batching must not change results).

How to run it (from the repository root)
    .venv/bin/python benchmarks/eval_speed.py --model PATH/TO/HF_FOLDER --text FILE
    # no model at hand: make a random Llama (hidden 256, 4 layers, character tokenizer)
    .venv/bin/python benchmarks/eval_speed.py --make-random-llama /tmp/rl256 --text docs/merging.md

    A file with fewer documents than --texts is cycled. --threads sets torch's intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def make_random_llama(path: Path) -> Path:
    """A random Llama with hidden size 256 and 4 layers, using the tests' character tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from eval_util import char_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      vocab_size=128, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="HF causal LM folder with a tokenizer")
    ap.add_argument("--make-random-llama", type=Path, metavar="DIR",
                    help="create a random hidden-256/4-layer Llama in DIR and use it")
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, help="also write the table as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.make_random_llama:
        args.model = args.model or make_random_llama(args.make_random_llama)
    if args.model is None:
        ap.error("give --model or --make-random-llama")

    from deltawise.data.read import load_items
    from deltawise.eval.models import load_model
    from deltawise.eval.perplexity import perplexity

    lm = load_model(args.model)
    items = load_items(args.text)
    texts = [items[i % len(items)].text for i in range(args.texts)]
    docs = [lm.tokenizer(t)["input_ids"] for t in texts]
    kw = dict(max_length=args.max_length, stride=args.max_length // 2, pad_id=lm.pad_id)
    perplexity(lm.model, docs[: max(args.batch_sizes)], batch_size=max(args.batch_sizes), **kw)  # warm-up
    n_params = sum(p.numel() for p in lm.model.parameters())
    print(f"model {args.model} ({n_params / 1e6:.1f}M parameters), {len(docs)} texts, max_length {args.max_length}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'seconds':>8} {'tokens':>8} {'tokens/s':>9} {'perplexity':>11}", flush=True)
    rows = []
    for bs in args.batch_sizes:
        start = time.perf_counter()
        ppl = perplexity(lm.model, docs, batch_size=bs, **kw)
        seconds = time.perf_counter() - start
        r = {"batch_size": bs, "seconds": seconds, "tokens": ppl.n_tokens, "tokens_per_s": ppl.n_tokens / seconds,
             "perplexity": ppl.value}
        rows.append(r)
        print(f"{r['batch_size']:>5} {r['seconds']:>8.2f} {r['tokens']:>8} {r['tokens_per_s']:>9.0f} {r['perplexity']:>11.4f}",
              flush=True)
    same = all(abs(r["perplexity"] - rows[0]["perplexity"]) <= 1e-4 * rows[0]["perplexity"] for r in rows)
    print("perplexity identical across batch sizes:", "yes" if same else "NO")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "parameters": n_params, "texts": len(docs), "rows": rows},
                                        indent=2))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
