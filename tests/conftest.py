import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
# `cartridge train` flags for a cartridge trained in seconds (real model, real self-study).
# (Spread excerpts: the default attention initialisation reads the whole corpus once, which costs minutes on
# a 2-core CPU; test_quality covers it.)
TINY_TRAIN = ["--tokens", "16", "--conversations", "4", "--steps", "2", "--chunk-tokens", "96", "--batch-size", "2",
              "--answer-tokens", "24", "--init", "spread"]


@pytest.fixture(autouse=True)
def cartridge_home(tmp_path, monkeypatch):
    """Every test gets its own empty data home, so nothing touches the user's files."""
    home = tmp_path / "home"
    monkeypatch.setenv("CARTRIDGE_HOME", str(home))
    return home


@pytest.fixture
def db(cartridge_home):
    from engine.store.registry import open_registry

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


@contextmanager
def served_app(first_port: int):
    """The desktop app served in this process on 127.0.0.1; yields (demo, url). Stops every job it left."""
    from app.ports import free_port
    from app.ui import build_app

    demo = build_app()
    port = free_port(first_port)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        if demo.watch_service is not None:
            demo.watch_service.stop()
        queue = demo.training_queue
        for job in queue.jobs():  # leave no job running into the next test
            if queue.cancel(job.id):
                queue.wait(job.id, timeout=120)
