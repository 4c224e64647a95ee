"""Turn a model reference (local path or hub id) into a local folder, without surprise downloads.

A reference that exists on disk, or that looks like a path (``./x``, ``../x``, ``/x``, ``~/x``,
or ``dir/x`` where ``dir`` exists locally), is always local: it never triggers a network call.
``hf://owner/name`` forces the hub. A bare ``owner/name`` that is not on disk is fetched with
``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE`` (cache only).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from deltawise.errors import InputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json"]


def looks_local(ref: str) -> bool:
    if ref.startswith(("./", "../", "/", "~", ".\\")) or ref in (".", ".."):
        return True
    head = ref.split("/", 1)[0]
    return "/" in ref and Path(head).exists()


def relative_to_cwd(ref: str) -> str:
    """For a message about a missing relative path: the directory it was resolved against."""
    if Path(ref).expanduser().is_absolute():
        return ""
    return f" (relative paths are resolved against the working directory {Path.cwd()})"


def require_local_or_hub_id(ref: str) -> None:
    """InputError unless ``ref`` exists on disk or can be a hub id (``owner/name``): what ``resolve_model``
    accepts, for callers that hand ``ref`` to transformers, whose error for a missing path is about repo ids."""
    if not ref.startswith("hf://") and not Path(ref).expanduser().exists() and (looks_local(ref) or not HUB_ID.match(ref)):
        raise InputError(f"model {ref!r} not found: no such file or folder{relative_to_cwd(ref)}")


def resolve_model(ref: str, *, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """Local folder (or file) holding the model named by ``ref``."""
    forced_hub = ref.startswith("hf://")
    if not forced_hub:
        local = Path(ref).expanduser()
        if local.exists():
            return local
        if looks_local(ref) or not HUB_ID.match(ref):
            raise InputError(f"model {ref!r} not found: no such local path{relative_to_cwd(ref)}")
    repo_id = ref.removeprefix("hf://")
    if not HUB_ID.match(repo_id):
        raise InputError(f"{ref!r} is not a valid hub id (expected owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise InputError(f"cannot fetch {repo_id!r}: huggingface_hub is not installed ({exc})") from None
    patterns = WEIGHT_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise InputError(f"cannot fetch model {repo_id!r} from the hub{hint}: {exc}") from None
    return Path(folder)
