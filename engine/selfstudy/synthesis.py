"""Self-study: the model writes the training conversations for its own cartridge.

For each corpus chunk: (1) given the chunk in its system prompt and a seed prompt, the model samples a
message a user might send (a seed with placeholders such as `{topic}` is instead the message itself,
filled from the chunk: small models write poor questions but answer well-posed ones); (2) given the
chunk and that message, it answers greedily, and the teacher's top-k log-probabilities at every answer
position are kept for distillation. Both turns share the
chunk's system-prompt KV (prefilled once per chunk), and several chunks run as one left-padded batch.

Backends share one signature; `BACKENDS` maps a name to an implementation: `torch_backend` and, when
llama-cpp-python imports, `llamacpp_backend`. The prompts and filters both use are in `prompts`.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Iterable, Iterator

from engine.engines.models import LoadedModel
from engine.errors import UserError
from engine.selfstudy.conversations import Conversation
from engine.selfstudy.torch_backend import _synthesize_torch

BACKENDS: dict[str, Callable[..., Iterator[Conversation]]] = {"torch": _synthesize_torch}


def _register_llamacpp() -> None:
    """Pick up `engine.selfstudy.llamacpp_backend.llamacpp_backend` (same signature as the torch backend) when it
    can be imported."""
    if "llamacpp" in BACKENDS:
        return
    try:
        from engine.selfstudy.llamacpp_backend import llamacpp_backend
    except Exception:  # llama-cpp-python missing or broken: the torch backend remains
        return
    BACKENDS["llamacpp"] = llamacpp_backend


def synthesis_backend(lm: LoadedModel, backend: str = "auto") -> str:
    """The backend `synthesize` runs for `backend`: "auto" takes llama.cpp for the default model on a CPU."""
    name = backend
    if backend in ("auto", "llamacpp"):
        _register_llamacpp()
    if backend == "auto":
        # llama.cpp runs the quantised GGUF itself: worth it for the default model on a CPU.
        use_llamacpp = ("llamacpp" in BACKENDS and lm.device.type == "cpu" and lm.spec == "default"
                        and importlib.util.find_spec("llama_cpp") is not None)
        name = "llamacpp" if use_llamacpp else "torch"
    if name not in BACKENDS:
        raise UserError(f"unknown synthesis backend {backend!r}: use one of auto, {', '.join(sorted(BACKENDS))}")
    return name


def synthesize(
    lm: LoadedModel,
    chunks: Iterable,
    n: int,
    *,
    seeds: dict[str, list[str]],
    k: int = 20,
    temperature: float = 0.6,
    max_user_tokens: int = 96,
    max_answer_tokens: int = 192,
    batch_size: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
    backend: str = "torch",
) -> Iterator[Conversation]:
    """Yield up to `n` self-study conversations drawn from `chunks` (one chunk per attempt; chunks whose
    user turn fails the filter twice are skipped, so pass more chunks than `n` to be sure of getting n).

    Answers keep their final stop token (with its top-k): the cartridge must also learn when to stop.
    """
    if not seeds:
        raise UserError("no seed prompts")
    if batch_size is None:
        # On CPU, decoding is bound by memory traffic (weights + the growing KV cache): beyond ~8 rows
        # the cache copies cost more than the batching saves. A GPU takes far more rows.
        batch_size = 8 if lm.device.type == "cpu" else 32
    name = synthesis_backend(lm, backend)
    return BACKENDS[name](lm, chunks, n, seeds=seeds, k=k, temperature=temperature, max_user_tokens=max_user_tokens,
                          max_answer_tokens=max_answer_tokens, batch_size=batch_size, on_progress=on_progress,
                          seed=seed)
