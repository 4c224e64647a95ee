"""The files that travel with a model's weights: tokenizer, generation config, config."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Optional

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
OTHER_FILES = ("generation_config.json",)


def copy_present(src: Optional[Path], dest: Path, names: Iterable[str]) -> None:
    """Copy each of ``names`` that exists in ``src`` into ``dest`` (the inputs are only read)."""
    if src is None:
        return
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
