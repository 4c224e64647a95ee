"""PEFT adapter folders as deltas: read LoRA-family and FourierFT adapters, write LoRA adapters.

Reading (``PeftAdapter``): keys look like ``base_model.model.<module>.lora_A.weight``; the
prefix is stripped and ``<module>.weight`` is the base tensor changed. Per module
``scale = α_m / r_m`` (``α_m / √r_m`` with rsLoRA), ``α_m`` from ``alpha_pattern`` when a pattern
matches (PEFT's own rule: ``(.*\\.)?(pattern)$``) and ``r_m`` the stored rank.
``lora_embedding_A/B`` (LoRA on embeddings) and ``fan_in_fan_out`` layers give ``(B A)ᵀ``.
Any other stored tensor (``modules_to_save`` copies, trained biases, an embedding's saved
``base_layer``) replaces the base value, so its delta is ``value − base``; one the base lacks (the
new ``score``/``classifier`` head PEFT saves for a ``SEQ_CLS`` task) is a ``full`` entry, added to
the model as stored, as the heads our own methods train.
``lora_bias: true`` (``lora_B.bias``) changes ``<module>.bias`` by ``scale · bias``. DoRA
(``use_dora``) is read as the dense delta it induces on the base weight ``W`` (PEFT's merge,
row norms of the ``(out, in)`` weight): ``ΔW = m / ‖W + s·B A‖_row · (W + s·B A) − W``, so it
needs the base. KaSA and other variants whose forward is not ``B A`` are refused.

Writing (``write_peft_adapter``): each low-rank delta's scale is folded into B and every
module gets ``lora_alpha = r`` (scale 1), with ``rank_pattern``/``alpha_pattern`` entries for
modules whose rank differs from the most common one; target modules are listed by full name,
so nothing else in the model is touched; bias changes of LoRA modules go into ``lora_B.bias``
(``lora_bias: true``). An embedding table's low-rank delta (``transpose``) is written as PEFT's LoRA on
``nn.Embedding``: ``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (dim, r), delta ``(B A)ᵀ``. PEFT has
no ``lora_bias`` for embeddings, so beside them bias changes are written as the LoRA module's new bias
(``<module>.base_layer.bias``, ``bias: "lora_only"``), which PEFT loads into the base layer and which is read
back as a replaced value. A ``deltawise.json`` sidecar records the base.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from deltawise.architecture import architecture_for
from deltawise.delta.base import TensorDelta
from deltawise.delta.dense import DenseDelta
from deltawise.delta.full import FullDelta
from deltawise.delta.lowrank import LowRankDelta
from deltawise.delta.spectral import SpectralDelta
from deltawise.errors import InputError
from deltawise.io.reader import ModelReader
from deltawise.io.writer import write_json_atomic

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
SIDECAR = "deltawise.json"
PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B|embedding_A|embedding_B)(\.[^.]+)?(\.weight)?$")
LORA_BIAS_KEY = re.compile(r"^(?P<module>.+)\.lora_B(\.[^.]+)?\.bias$")
DORA_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$")
# LoRA variants whose forward is not base + s·B A (or whose merge PEFT itself refuses): not a delta we can read
UNSUPPORTED_VARIANTS = ("kasa_config", "use_qalora", "use_bdlora", "monteclora_config", "alora_invocation_tokens",
                        "arrow_config", "velora_config")
FOURIER_KEY = re.compile(r"^(?P<module>.+)\.fourierft_spectrum(\.[^.]+)?$")
SUPPORTED = ("LORA", "FOURIERFT")


def is_peft_adapter(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class _Entry:
    how: str  # "lora" | "lora_bias" | "dora" | "fourier" | "full"
    keys: tuple[str, ...]
    scale: float = 1.0
    transpose: bool = False


class PeftAdapter:
    """A PEFT adapter folder seen as a delta source (same interface as ``DeltaFile``)."""

    def __init__(self, folder: Path, base_reader: Optional[ModelReader] = None):
        self.folder = Path(folder)
        self.base_reader = base_reader
        try:
            self.config = json.loads((self.folder / CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"adapter {self.folder}: cannot read {CONFIG} ({exc})") from None
        peft_type = str(self.config.get("peft_type", "")).upper()
        if peft_type not in SUPPORTED:
            raise InputError(f"adapter {self.folder}: peft_type {peft_type or '?'} is not supported "
                             f"(supported: {', '.join(SUPPORTED)})")
        variants = [key for key in UNSUPPORTED_VARIANTS if self.config.get(key)]
        if variants:
            raise InputError(f"adapter {self.folder}: {', '.join(variants)} is set; this LoRA variant's forward is not "
                             "base + scale * B A, so it is not read as a delta (merge it with PEFT first)")
        weights = self.folder / WEIGHTS
        if not weights.is_file():
            hint = (" (adapter_model.bin is pickle: convert it to safetensors)"
                    if (self.folder / "adapter_model.bin").exists() else "")
            raise InputError(f"adapter {self.folder}: no {WEIGHTS}{hint}")
        self.reader = ModelReader(weights, label=str(self.folder))
        self.peft_type = peft_type
        sidecar = self.folder / SIDECAR
        self.sidecar = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        self.entries = self._parse()

    # ------------------------------------------------------------ parsing
    def _parse(self) -> dict[str, _Entry]:
        lora: dict[str, dict[str, str]] = {}
        entries: dict[str, _Entry] = {}
        for key in self.reader.keys():
            short = key.removeprefix(PREFIX)
            if self.peft_type == "LORA" and (m := LORA_BIAS_KEY.match(short)):
                lora.setdefault(m["module"], {})["bias"] = key  # before LORA_KEY, which would take it for lora_B
            elif self.peft_type == "LORA" and (m := DORA_KEY.match(short)):
                lora.setdefault(m["module"], {})["magnitude"] = key
            elif self.peft_type == "LORA" and (m := LORA_KEY.match(short)):
                lora.setdefault(m["module"], {})[m["which"]] = key
            elif self.peft_type == "FOURIERFT" and (m := FOURIER_KEY.match(short)):
                entries[f"{m['module']}.weight"] = _Entry("fourier", (key,), float(self.config.get("scaling", 150.0)))
            else:  # modules_to_save copy, trained bias, or an embedding's base layer (save_embedding_layers)
                entries[short.replace(".base_layer.", ".")] = _Entry("full", (key,))
        for module, parts in lora.items():
            embedding = "embedding_A" in parts or "embedding_B" in parts
            a, b = ("embedding_A", "embedding_B") if embedding else ("A", "B")
            if a not in parts or b not in parts:
                raise InputError(f"adapter {self.folder}: module {module} has only one of lora_{a}/lora_{b}")
            rank = self.reader.info(parts[a]).shape[0]
            alpha = float(pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8)))
            scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
            transpose = embedding or bool(self.config.get("fan_in_fan_out"))
            dora = "magnitude" in parts
            if dora and transpose:
                raise InputError(f"adapter {self.folder}: DoRA on {module} (an embedding or fan_in_fan_out layer) "
                                 "is not supported")
            keys = (parts[a], parts[b], parts["magnitude"]) if dora else (parts[a], parts[b])
            entries[f"{module}.weight"] = _Entry("dora" if dora else "lora", keys, scale, transpose)
            if "bias" in parts:
                entries[f"{module}.bias"] = _Entry("lora_bias", (parts["bias"],), scale)
        return entries

    def _need_base(self, name: str, why: str) -> tuple[ModelReader, str]:
        """The base reader and the name ``name`` has in it: an output head of a tied base is stored
        as its input embedding (PEFT saves it under the head's name, as mergekit's extraction does)."""
        if self.base_reader is None:
            raise InputError(f"adapter {self.folder}: {name} needs the base model ({why})")
        if name in self.base_reader:
            return self.base_reader, name
        alias = architecture_for(self.base_reader.config).tied_alias(name, self.base_reader)
        if alias is None:
            label = self.base_reader.label
            raise InputError(f"adapter {self.folder} changes {name!r}, which the base model {label!r} does not have")
        return self.base_reader, alias

    # ------------------------------------------------------------ the DeltaSource interface
    @property
    def base(self) -> dict[str, Any]:
        recorded = self.sidecar.get("base", {})
        return {"ref": self.config.get("base_model_name_or_path"), **recorded}

    @property
    def header(self) -> dict[str, Any]:
        return {"method": f"peft-{self.peft_type.lower()}", "parameters": self.config, "base": self.base}

    @property
    def files(self) -> list[Path]:
        return [self.folder / CONFIG, self.folder / WEIGHTS]

    def names(self) -> list[str]:
        return list(self.entries)

    def kind(self, name: str) -> str:
        how = self.entries[name].how
        if how == "full" and not self._base_has(name):
            return "full"  # a new value with no base tensor to subtract: a new classification head, added as stored
        return {"lora": "lowrank", "lora_bias": "dense", "dora": "dense", "fourier": "spectral", "full": "dense"}[how]

    def _base_has(self, name: str) -> bool:
        """Whether the base stores ``name`` (itself, or as the embedding its tied output head is); unknown
        without a base reader, where a stored value can only replace the model's tensor (``FullDelta``)."""
        reader = self.base_reader
        return reader is not None and (name in reader or architecture_for(reader.config).tied_alias(name, reader) is not None)

    def base_dtype(self, name: str) -> torch.dtype:
        if self.base_reader is not None and name in self.base_reader:
            return self.base_reader.info(name).dtype
        return self.reader.info(self.entries[name].keys[0]).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self.entries[name]
        if entry.how in ("lora", "dora"):
            a, b = (self.reader.info(k).shape for k in entry.keys[:2])
            return (a[1], b[0]) if entry.transpose else (b[0], a[1])
        if entry.how == "fourier":
            reader, base_name = self._need_base(name, "FourierFT stores no shape")
            return reader.info(base_name).shape
        return self.reader.info(entry.keys[0]).shape

    def get(self, name: str) -> TensorDelta:
        entry = self.entries.get(name)
        if entry is None:
            raise InputError(f"adapter {self.folder} does not change {name!r}")
        if entry.how == "lora":
            A, B = (self.reader.get(k) for k in entry.keys)
            return LowRankDelta(A, B, entry.scale, entry.transpose)
        if entry.how == "fourier":
            return self._fourier(name, entry)
        if entry.how == "lora_bias":
            bias = self.reader.get(entry.keys[0])
            return DenseDelta(entry.scale * bias.to(torch.float64 if bias.dtype == torch.float64 else torch.float32))
        if entry.how == "dora":
            return self._dora(name, entry)
        if not self._base_has(name):  # a new head (modules_to_save on a SEQ_CLS model), or no base at hand
            return FullDelta(self.reader.get(entry.keys[0]))
        reader, base_name = self._need_base(name, "it stores a full replacement value")
        base = reader.get(base_name)
        value = self.reader.get(entry.keys[0])
        if value.shape != base.shape:
            raise InputError(f"adapter {self.folder}: {name} has shape {list(value.shape)}, the base has {list(base.shape)}")
        return FullDelta(value).relative_to(base)  # value − base, in float64 (see full.py)

    def _dora(self, name: str, entry: _Entry) -> DenseDelta:
        """The dense delta of a DoRA layer: ``m / ‖V‖_row · V − W`` with ``V = W + s·B A`` (PEFT's merge)."""
        reader, base_name = self._need_base(name, "a DoRA delta depends on the base weight")
        A, B, magnitude = (self.reader.get(k) for k in entry.keys)
        weight = reader.get(base_name)
        work = torch.float64 if torch.float64 in (weight.dtype, A.dtype, B.dtype) else torch.float32
        if magnitude.reshape(-1).shape[0] != weight.shape[0]:
            raise InputError(f"adapter {self.folder}: the DoRA magnitude of {name} has {magnitude.numel()} entries, "
                             f"the base weight {weight.shape[0]} rows")
        base = weight.to(work)
        direction = base + entry.scale * (B.to(work) @ A.to(work))
        norm = torch.linalg.norm(direction, dim=1, keepdim=True)
        return DenseDelta(magnitude.to(work).reshape(-1, 1) / norm * direction - base)

    def _fourier(self, name: str, entry: _Entry) -> SpectralDelta:
        shape = self.shape(name)
        if self.config.get("fan_in_fan_out"):
            raise InputError(f"adapter {self.folder}: FourierFT with fan_in_fan_out is not supported")
        coefficients = self.reader.get(entry.keys[0])
        seed = int(self.config.get("random_loc_seed", 777))
        # PEFT draws the frequency positions from a fresh generator with this seed, per layer
        indices = torch.randperm(shape[0] * shape[1], generator=torch.Generator().manual_seed(seed))[: coefficients.numel()]
        return SpectralDelta(shape, indices, coefficients, entry.scale)

    def fingerprint(self) -> str:
        h = hashlib.sha256((self.folder / CONFIG).read_bytes())
        h.update(self.reader.fingerprint().encode())
        return h.hexdigest()


def complete_modules(full: dict[str, torch.Tensor], base: ModelReader) -> dict[str, torch.Tensor]:
    """The base values of the tensors of ``full``'s modules that ``full`` lacks (a LayerNorm whose weight changed
    and bias did not): PEFT's ``modules_to_save`` replaces the whole module and loads every one of its tensors."""
    modules = {n.rsplit(".", 1)[0] for n in full}
    return {n: base.get(n) for n in base.keys() if n not in full and "." in n and n.rsplit(".", 1)[0] in modules}


def write_peft_adapter(
    folder: Path, lowrank: dict[str, LowRankDelta], full: dict[str, torch.Tensor], *,
    base_ref: Optional[str], task_type: Optional[str], sidecar: dict[str, Any],
    bias: Optional[dict[str, torch.Tensor]] = None, bias_values: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into an existing (staging)
    folder. Keys of ``lowrank`` and ``full`` are base tensor names (``<module>.weight``); a transposed
    low-rank delta is an embedding table's, written as LoRA-embedding factors.
    ``bias``: bias deltas of LoRA modules (``<module>.bias``), written as ``lora_B.bias`` with
    ``lora_bias: true`` (zeros for the other LoRA modules, as PEFT then gives every one a bias).
    ``bias_values``: new bias values of LoRA modules, written as ``<module>.base_layer.bias`` (``bias: "lora_only"``):
    the form beside LoRA embeddings, which PEFT refuses ``lora_bias`` for."""
    tensors: dict[str, torch.Tensor] = {}
    bias, bias_values = bias or {}, bias_values or {}
    if bias and bias_values:
        raise ValueError("give bias deltas (lora_B.bias) or bias values (base_layer.bias), not both")
    if bias and any(d.transpose for d in lowrank.values()):
        raise ValueError("PEFT has no lora_bias for LoRA on embeddings: write the biases as bias_values")
    for name in [*bias, *bias_values]:
        if f"{name.removesuffix('.bias')}.weight" not in lowrank:
            raise ValueError(f"{name}: a LoRA bias needs LoRA factors of the module's weight")
    ranks: dict[str, int] = {}
    for name, d in lowrank.items():
        module = name.removesuffix(".weight")
        ranks[module] = d.rank
        a, b = ("lora_embedding_A", "lora_embedding_B") if d.transpose else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{module}.{a}"] = d.A.contiguous()
        tensors[f"{PREFIX}{module}.{b}"] = (d.B * d.scale).to(d.B.dtype).contiguous()
        if bias:
            value = bias.get(f"{module}.bias")
            tensors[f"{PREFIX}{module}.lora_B.bias"] = (torch.zeros(d.B.shape[0], dtype=d.B.dtype) if value is None
                                                        else value.to(d.B.dtype).contiguous())
    for name, value in bias_values.items():
        tensors[f"{PREFIX}{name.removesuffix('.bias')}.base_layer.bias"] = value.contiguous()
    for name, value in full.items():
        tensors[f"{PREFIX}{name}"] = value.contiguous()
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_ref,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in full}) or None,
        "lora_dropout": 0.0, "bias": "lora_only" if bias_values else "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "lora_bias": bool(bias),
    }
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    write_json_atomic(folder / CONFIG, config)
    write_json_atomic(folder / SIDECAR, sidecar)
