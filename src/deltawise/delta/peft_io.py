"""PEFT adapter folders as deltas: read LoRA-family and FourierFT adapters, write LoRA adapters.

Reading (``PeftAdapter``): keys look like ``base_model.model.<module>.lora_A.weight``; the
prefix is stripped and ``<module>.weight`` is the base tensor changed. Per module
``scale = α_m / r_m`` (``α_m / √r_m`` with rsLoRA), ``α_m`` from ``alpha_pattern`` when a pattern
matches (PEFT's own rule: ``(.*\\.)?(pattern)$``) and ``r_m`` the stored rank.
``lora_embedding_A/B`` (LoRA on embeddings) and ``fan_in_fan_out`` layers give ``(B A)ᵀ``.
Any other stored tensor (``modules_to_save`` copies, trained biases) replaces the base value,
so its delta is ``value − base``; one the base lacks (the new ``score``/``classifier`` head PEFT
saves for a ``SEQ_CLS`` task) is a ``full`` entry, added to the model as stored, as the heads our
own methods train. DoRA and other non-additive variants are refused.

Writing (``write_peft_adapter``): each low-rank delta's scale is folded into B and every
module gets ``lora_alpha = r`` (scale 1), with ``rank_pattern``/``alpha_pattern`` entries for
modules whose rank differs from the most common one; target modules are listed by full name,
so nothing else in the model is touched. A ``deltawise.json`` sidecar records the base.
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
    how: str  # "lora" | "fourier" | "full"
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
        if self.config.get("use_dora"):
            raise InputError(f"adapter {self.folder}: DoRA adapters rescale the weight column-wise and are not an additive "
                             "delta; merge them with PEFT first")
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
            if "lora_magnitude_vector" in short:
                raise InputError(f"adapter {self.folder}: {key} is a DoRA magnitude; DoRA is not an additive delta")
            if self.peft_type == "LORA" and (m := LORA_KEY.match(short)):
                lora.setdefault(m["module"], {})[m["which"]] = key
            elif self.peft_type == "FOURIERFT" and (m := FOURIER_KEY.match(short)):
                entries[f"{m['module']}.weight"] = _Entry("fourier", (key,), float(self.config.get("scaling", 150.0)))
            else:
                entries[short] = _Entry("full", (key,))  # modules_to_save copy or trained bias
        for module, parts in lora.items():
            embedding = "embedding_A" in parts or "embedding_B" in parts
            a, b = ("embedding_A", "embedding_B") if embedding else ("A", "B")
            if a not in parts or b not in parts:
                raise InputError(f"adapter {self.folder}: module {module} has only one of lora_{a}/lora_{b}")
            rank = self.reader.info(parts[a]).shape[0]
            alpha = float(pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8)))
            scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
            transpose = embedding or bool(self.config.get("fan_in_fan_out"))
            entries[f"{module}.weight"] = _Entry("lora", (parts[a], parts[b]), scale, transpose)
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
        return {"lora": "lowrank", "fourier": "spectral", "full": "dense"}[how]

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
        if entry.how == "lora":
            a, b = (self.reader.info(k).shape for k in entry.keys)
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
        if not self._base_has(name):  # a new head (modules_to_save on a SEQ_CLS model), or no base at hand
            return FullDelta(self.reader.get(entry.keys[0]))
        reader, base_name = self._need_base(name, "it stores a full replacement value")
        base = reader.get(base_name)
        value = self.reader.get(entry.keys[0])
        if value.shape != base.shape:
            raise InputError(f"adapter {self.folder}: {name} has shape {list(value.shape)}, the base has {list(base.shape)}")
        return FullDelta(value).relative_to(base)  # value − base, in float64 (see full.py)

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


def write_peft_adapter(
    folder: Path, lowrank: dict[str, LowRankDelta], full: dict[str, torch.Tensor], *,
    base_ref: Optional[str], task_type: Optional[str], sidecar: dict[str, Any],
) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into an existing (staging)
    folder. Keys of ``lowrank`` and ``full`` are base tensor names (``<module>.weight``)."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, d in lowrank.items():
        if d.transpose:
            raise ValueError(f"{name}: transposed (embedding / fan_in_fan_out) LoRA is not written")
        module = name.removesuffix(".weight")
        ranks[module] = d.rank
        tensors[f"{PREFIX}{module}.lora_A.weight"] = d.A.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = (d.B * d.scale).to(d.B.dtype).contiguous()
    for name, value in full.items():
        tensors[f"{PREFIX}{name}"] = value.contiguous()
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_ref,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in full}) or None,
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True,
    }
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    write_json_atomic(folder / CONFIG, config)
    write_json_atomic(folder / SIDECAR, sidecar)
