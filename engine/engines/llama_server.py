"""llama.cpp's own `llama-server` for the bundled model, built once from the llama.cpp sources that the
installed llama-cpp-python release vendors (its sdist, fetched through pip), with the compile flags that
llama-cpp-python was built with. The binary is cached beside the virtual environment.

llama-cpp-python's Python server is no substitute: it keys top log-probabilities by decoded text, without
token ids, so two tokens that decode alike collide; `llama-server` returns ids (`n_probs`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from engine.errors import UserError

PACKAGE = "llama-cpp-python"


def cache_dir() -> Path:
    return Path(sys.prefix) / "llama-server"


def binary_path() -> Path:
    return cache_dir() / ("llama-server.exe" if os.name == "nt" else "llama-server")


def build_flags() -> list[str]:
    """The CMAKE_ARGS llama-cpp-python was compiled with (the setup records them), so both builds agree."""
    stamp = Path(sys.prefix) / ".llama-cpp-build"
    try:
        return shlex.split(stamp.read_text().strip())
    except OSError:
        return []


def _wanted() -> dict:
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise UserError(f"{PACKAGE} is not installed: run `python launcher.py` once to set up") from None
    return {"version": version, "flags": build_flags()}


def is_built() -> bool:
    try:
        return binary_path().exists() and json.loads((cache_dir() / "build.json").read_text()) == _wanted()
    except (OSError, ValueError):
        return False


def _tool(name: str) -> str:
    """`cmake` / `ninja` from PATH, else from the virtual environment (installed there from PyPI once)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", name], check=True)
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        raise UserError(f"could not find or install {name}, which building llama-server needs")
    return found


def ensure_built(say: Callable[[str], None] = print) -> Path:
    """The llama-server binary, compiled first if this environment has none (about 8 minutes on 2 cores)."""
    if is_built():
        return binary_path()
    wanted = _wanted()
    cache_dir().mkdir(parents=True, exist_ok=True)
    say(f"building llama-server from {PACKAGE} {wanted['version']}'s llama.cpp sources (once; about 8 minutes "
        "on 2 cores)")
    with tempfile.TemporaryDirectory(prefix="llama-server-", dir=cache_dir()) as tmp:
        tmp = Path(tmp)
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
                                  "--no-deps", "--no-binary", ":all:",
                                  f"{PACKAGE}=={wanted['version']}", "-d", str(tmp)], capture_output=True, text=True)
        sdists = list(tmp.glob("*.tar.gz"))
        if not sdists:
            raise UserError(f"could not fetch the {PACKAGE} {wanted['version']} sources: {fetched.stderr.strip()[-400:]}")
        with tarfile.open(sdists[0]) as archive:
            members = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in m.name]
            archive.extractall(tmp, members=members, filter="data")
        source = next(tmp.glob("*/vendor/llama.cpp"))
        build = tmp / "build"
        cmake = _tool("cmake")
        configure = [cmake, "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
                     "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF",
                     "-DLLAMA_OPENSSL=OFF", *wanted["flags"]]
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"]
        for step in (configure, [cmake, "--build", str(build), "--target", "llama-server",
                                 "-j", str(os.cpu_count() or 2)]):
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                raise UserError(f"building llama-server failed ({' '.join(step[:3])} ...):\n"
                                f"{(done.stdout + done.stderr).strip()[-1500:]}")
        built = next((p for p in build.rglob(binary_path().name) if p.is_file()), None)
        if built is None:
            raise UserError("building llama-server finished without a llama-server binary")
        shutil.copy2(built, binary_path())
    (cache_dir() / "build.json").write_text(json.dumps(wanted))
    return binary_path()


def server_command(model: Path, *, port: int, parallel: int = 4, ctx: int = 4096, threads: int | None = None) -> list[str]:
    """The command line that serves `model` on 127.0.0.1:`port`, `parallel` requests at a time, each with
    a context of `ctx` tokens."""
    command = [str(binary_path()), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(parallel), "--ctx-size", str(ctx * parallel), "--no-webui"]
    if threads:
        command += ["--threads", str(threads)]
    return command


def wait_until_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Wait for `GET /health` to answer 200 (the model is loaded)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise UserError(f"llama-server exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(url.rstrip("/") + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise UserError(f"llama-server did not become ready at {url} within {timeout:.0f} s")
