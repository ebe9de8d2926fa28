import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"


@pytest.fixture(autouse=True)
def cartridge_home(tmp_path, monkeypatch):
    """Every test gets its own empty data home, so nothing touches the user's files."""
    home = tmp_path / "home"
    monkeypatch.setenv("CARTRIDGE_HOME", str(home))
    return home


@pytest.fixture
def db(cartridge_home):
    from engine.registry import open_registry

    return open_registry()


def write(root: Path, rel: str, content: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def run_cli(*args: str, env_home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `cartridge` command line in a subprocess."""
    env = {**os.environ, "CARTRIDGE_HOME": str(env_home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)
