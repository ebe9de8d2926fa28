"""Kill -9 of a real training process at each stage: during self-study, during training, and while the
cartridge is being written. After each, the registry opens, the ready version keeps serving, the run is
marked interrupted at the next start, and a resume produces a ready cartridge."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ASSETS, ROOT, run_cli
from engine.training import pipeline
from engine.store import registry

FLAGS = ["--tokens", "16", "--conversations", "8", "--steps", "6", "--chunk-tokens", "96", "--batch-size", "2",
         "--answer-tokens", "24", "--init", "spread"]


@pytest.fixture
def serving(tmp_path, cartridge_home):
    """A copy of the sample folder, ingested and trained once: v1 is ready and current."""
    root = tmp_path / "notes"
    shutil.copytree(ASSETS / "sample", root)
    assert run_cli("ingest", str(root), "--name", "notes", env_home=cartridge_home).returncode == 0
    assert run_cli("train", "notes", *FLAGS, env_home=cartridge_home).returncode == 0
    return root


def kill_at(stage: str, home) -> subprocess.Popen:
    """Start `cartridge train notes` and SIGKILL it once it reaches `stage` (its stderr says which)."""
    env = {**os.environ, "CARTRIDGE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "train", "notes", *FLAGS], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    marks = {"synthesis": "synthesis: ", "training": "training: ", "save": "writing the cartridge"}
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marks[stage] in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before {stage}: {''.join(seen)[-2000:]}"
    return proc


@pytest.mark.parametrize("stage", ["synthesis", "training", "save"])
def test_kill_9_loses_nothing(serving, stage, cartridge_home):
    root = serving
    note = sorted(root.glob("*.md"))[0]
    note.write_text(note.read_text() + f"\nAdded before a crash during {stage}: the kettle is in the loft.\n")
    assert run_cli("ingest", str(root), "--name", "notes", env_home=cartridge_home).returncode == 0

    kill_at(stage, cartridge_home)

    db = registry.open_registry()  # the registry opens
    corpus = registry.get_corpus(db, "notes")
    recovered = pipeline.recover_interrupted(db)
    latest = registry.latest_version(db, corpus["id"])
    if stage == "save" and latest["status"] == "ready":
        # The kill landed after the cartridge and the registry were both written: nothing to resume.
        assert not recovered and registry.list_runs(db, corpus["id"])[-1]["status"] == "done"
        assert os.path.isfile(os.path.join(latest["cartridge"], "adapter_model.safetensors"))
        return
    assert len(recovered) == 1 and registry.list_runs(db, corpus["id"])[-1]["status"] == "interrupted"
    assert corpus["current_version"] == 1 and latest["number"] == 2 and latest["status"] != "ready"

    proc = run_cli("chat", "notes", "--prompt", "Where is the kettle?", "--max-tokens", "4", "--json",
                   env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr  # v1 still serves
    assert [{k: v[k] for k in ("corpus", "version")} for v in json.loads(proc.stdout)["versions"]] == [
        {"corpus": "notes", "version": 1}]

    proc = run_cli("train", "notes", "--resume", "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["version"] == 2 and doc["current"] is True
    assert registry.get_corpus(db, "notes")["current_version"] == 2
    names = sorted(p.name for p in (cartridge_home / "cartridges" / corpus["uid"]).iterdir())
    v1 = os.path.basename(registry.get_version(db, corpus, 1)["cartridge"])
    assert names == sorted([v1, os.path.basename(doc["cartridge"])]), names  # no half-written folder left
