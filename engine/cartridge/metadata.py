"""A cartridge folder's `cartridge.json`, read without loading torch (listings, settings, base model)."""

from __future__ import annotations

import json
from pathlib import Path

METADATA = "cartridge.json"
# llama.cpp keeps the KV cache in float16, where a larger value would become infinite: the bound on a
# cartridge's values, checked where it is saved, loaded and written into llama.cpp.
KV_VALUE_LIMIT = 65504.0


def read_metadata(folder: str | Path | None) -> dict:
    """The folder's metadata, or {} when the folder or the file is missing or unreadable."""
    if not folder:
        return {}
    try:
        meta = json.loads((Path(folder) / METADATA).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def cartridge_p(meta: dict) -> int | None:
    """The metadata's p (virtual tokens), or None when it is not a positive whole number (an edited file)."""
    p = meta.get("p")
    return p if type(p) is int and p > 0 else None


def trained_setting(folder: str | Path | None, name: str, default=None):
    """A training setting the cartridge was made with (`default` when it does not say)."""
    return ((read_metadata(folder).get("training") or {}).get("train") or {}).get(name, default)
