"""Base of every result JSON deltawise writes (eval, analyze): pydantic, saved atomically."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from deltawise.io.writer import write_json_atomic


class SavedResult(BaseModel):
    """Subclasses declare ``schema_`` (written as ``schema``) and ``kind``, which the report uses to tell results apart."""

    model_config = {"populate_by_name": True}

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.model_dump(mode="json", by_alias=True))
