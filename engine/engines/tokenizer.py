"""The base model's tokenizer, with the GGUF one converted once and cached.

Converting the GGUF vocabulary takes ~10 s; loading the cached `tokenizer.json` takes milliseconds,
which keeps `ingest` fast.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

from engine.store.paths import cache_dir, default_model_path


def _default_tokenizer_dir() -> Path:
    gguf = default_model_path()
    target = cache_dir() / "tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (target / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def is_default(spec: str | None) -> bool:
    return spec in (None, "", "default")


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str | None = None):
    """A transformers fast tokenizer (with chat template) for `spec` (None: the default model)."""
    from transformers import AutoTokenizer

    if is_default(spec):
        return AutoTokenizer.from_pretrained(_default_tokenizer_dir())
    return AutoTokenizer.from_pretrained(spec)


@functools.lru_cache(maxsize=4)
def backend_tokenizer(spec: str | None = None):
    """The `tokenizers.Tokenizer` behind the model's tokenizer (fast, no transformers import for the default)."""
    from tokenizers import Tokenizer

    if is_default(spec):
        return Tokenizer.from_file(str(_default_tokenizer_dir() / "tokenizer.json"))
    return load_tokenizer(spec).backend_tokenizer


def token_counter(spec: str | None = None):
    """A function mapping a list of texts to their token counts."""
    backend = backend_tokenizer(spec)

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(enc.ids) for enc in backend.encode_batch(texts, add_special_tokens=False)]

    return count
