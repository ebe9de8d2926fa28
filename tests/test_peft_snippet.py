"""The README's plain transformers + PEFT snippet, run as written, answers as `cartridge chat --engine torch`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import ASSETS, ROOT, TINY_TRAIN, run_cli

QUESTION = "When is the workshop closed?"


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### A cartridge with plain transformers + PEFT"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_peft_snippet_gives_the_chat_answer(tmp_path, cartridge_home, monkeypatch):
    monkeypatch.setenv("CARTRIDGE_CPU_BF16", "0")  # fp32 matmuls like the snippet's, as the README says
    assert run_cli("ingest", str(ASSETS / "sample"), env_home=cartridge_home).returncode == 0
    proc = run_cli("train", "sample", *TINY_TRAIN, "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    folder = json.loads(proc.stdout)["cartridge"]
    snippet = readme_snippet()
    assert 'CARTRIDGE = "path/to/the/cartridge/folder"' in snippet and f'QUESTION = "{QUESTION}"' in snippet
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace('"path/to/the/cartridge/folder"', json.dumps(folder)))
    env = {**os.environ, "CARTRIDGE_HOME": str(cartridge_home)}
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, env=env,
                         cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    stock = ran.stdout.strip()

    proc = run_cli("chat", "sample", "--engine", "torch", "--prompt", QUESTION, "--max-tokens", "64", "--json",
                   env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)["answer"]
    assert len(answer) > 10 and stock.startswith(answer), (stock, answer)  # the loop guard may only cut it short
    proc = run_cli("chat", "sample", "--engine", "torch", "--mode", "none", "--prompt", QUESTION, "--max-tokens", "64",
                   "--json", env_home=cartridge_home)
    assert json.loads(proc.stdout)["answer"] != answer  # the cartridge changes the answer: it was not dropped
