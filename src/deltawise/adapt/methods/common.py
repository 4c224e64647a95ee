"""Parameters shared by several adapter methods, declared once and reused by each method's ``params``.

The LoRA family (lora, dora, pissa, lora_fa) shares ``LORA_PARAMS`` whole; other methods take the
pieces they use (our own adapters: ``RANK`` and ``TARGETS``; randlora: ``DROPOUT`` and ``TARGETS``).
"""

from __future__ import annotations

from deltawise.params import Param

RANK = Param("rank", int, 8, low=1, help="adapter rank r (PEFT's LoRA default 8)")
DROPOUT = Param("dropout", float, 0.0, low=0.0, high=1.0, high_open=True,
                help="dropout on the adapter's input (PEFT's default 0: none)")
TARGETS = Param("targets", list, None,
                help="module-name suffixes to adapt, comma-separated; default: PEFT's choice for the architecture "
                     "(Llama: q_proj,v_proj)")
LORA_ALPHA = Param("alpha", float, None, low=0.0, low_open=True,
                   help="scale numerator: the update is scaled by s = alpha/rank; default: the rank (s = 1)")
RSLORA = Param("rslora", bool, False,
               help="rank-stabilised scaling s = alpha/sqrt(rank) instead of alpha/rank (rsLoRA, Kalajdzievski 2023; "
                    "PEFT's use_rslora): at a large rank the update is not scaled down towards zero")
LORA_PARAMS: tuple[Param, ...] = (RANK, LORA_ALPHA, DROPOUT, TARGETS, RSLORA)
