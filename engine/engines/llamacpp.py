"""Serve cartridges through llama.cpp: the cartridge's KV is written into a llama.cpp context as the
state of sequence 0, and the conversation continues at position p.

Both stacks cache keys after RoPE, so a cartridge trained in torch can be handed to llama.cpp as is,
up to two layout details handled here:

- head-dim order of the keys: Hugging Face Llama-family models rotate halves (dims i and i + d/2 form a
  RoPE pair); GGUF files hold q/k weights permuted so that the pair is adjacent (dims 2i and 2i+1).
  So GGUF key dim 2i = HF dim i and GGUF dim 2i+1 = HF dim i + d/2. Values are not permuted.
- the cache is f16 (cartridges are fp32): values are rounded to the nearest f16.

The byte format of one sequence's state in llama-cpp-python 0.3.36 (llama.cpp's `llama_kv_cache`
`state_write`), all little-endian, for a sequence of `n` cells in one stream:

    u32 magic = 0xAF143CD8          (llama_context::state_seq_get_data)
    i32 seq_id                      (the sequence it was read from; ignored when written back)
    u32 n_stream = 1
    u32 cell_count = n
    n x { i32 pos, u32 n_seq_id = 1, i32 seq_id }
    u32 v_trans                      (1 when flash attention is off)
    u32 n_layer
    n_layer x { i32 k_type = 1 (GGML f16), u64 k_row_bytes = n_kv_heads*head_dim*2,
                n x k_row_bytes: cell-major rows [head][dim], dims in GGUF order }
    v_trans = 1: n_layer x { i32 v_type = 1, u32 v_el_bytes = 2, u32 n_embd_v = n_kv_heads*head_dim,
                n_embd_v x n x f16: values transposed, row j = element j of every cell }
    v_trans = 0: n_layer x { i32 v_type = 1, u64 v_row_bytes, n x v_row_bytes }

The layout is checked against the installed library when an engine starts (`check_layout`): a layout it
does not know raises `LayoutUnsupported`, and the app falls back to torch.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.cartridge.metadata import KV_VALUE_LIMIT
from engine.engines.decoding import accept, stack_topk
from engine.errors import CartridgeMismatch, UserError

KNOWN_VERSIONS = ("0.3.36",)
STATE_MAGIC = 0xAF143CD8
GGML_TYPE_F16 = 1
F16_BYTES = 2


class LayoutUnsupported(UserError):
    """The installed llama.cpp stores its KV cache in a layout this writer does not know: use torch."""


# ----------------------------------------------------------------------------- library


_log_lock = threading.Lock()
_last_errors: list[str] = []
_log_callback = None  # kept referenced: llama.cpp holds a raw pointer to it


def _install_logger() -> None:
    """Route llama.cpp's log to a small buffer of recent errors (printed only with CARTRIDGE_LLAMA_VERBOSE=1)."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    verbose = os.environ.get("CARTRIDGE_LLAMA_VERBOSE") == "1"

    @llama_cpp.llama_log_callback
    def _callback(level, text, user_data):  # noqa: ARG001
        message = text.decode("utf-8", "replace") if text else ""
        if verbose:
            print(message, end="", file=sys.stderr, flush=True)
        if level == 4 and message.strip():  # GGML_LOG_LEVEL_ERROR (ggml.h: 0 none, 1 debug, 2 info, 3 warn, 4 error)
            with _log_lock:
                _last_errors.append(message.strip())
                del _last_errors[:-8]

    _log_callback = _callback
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def _take_errors() -> str:
    with _log_lock:
        text = "; ".join(_last_errors[-3:])
        _last_errors.clear()
    return text


_backend_ready = False


def _llama():
    """The llama_cpp module, with its backend initialised once and its log captured."""
    global _backend_ready
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise LayoutUnsupported(f"llama-cpp-python is not installed ({exc})") from exc
    _install_logger()
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


def llamacpp_version() -> str:
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "?"))


def gpu_offload_available() -> bool:
    """True when this llama-cpp-python build can offload layers to a GPU (CUDA/Metal/Vulkan build)."""
    try:
        return bool(_llama().llama_supports_gpu_offload())
    except Exception:
        return False


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def default_threads() -> tuple[int, int]:
    """(decode threads, prompt threads). `CARTRIDGE_LLAMA_THREADS=n` sets both.

    Prompt evaluation scales with cores, so it takes them all. One-token decode steps are bound by memory
    traffic and gain less, but still gain: on a quiet 2-core machine 2 threads decode 89 vs 54 tokens/s at
    the start of a context and 72 vs 44 after 1,000 tokens (self-study 20% faster, the same conversations).
    ggml's spinning barriers make an oversubscribed context collapse (12x slower with 2 threads next to two
    busy processes on 2 cores); the `ThreadGovernor` drops to one thread when that happens. So decode uses
    half the cores, at least 2 and at most 4.
    """
    env = os.environ.get("CARTRIDGE_LLAMA_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env), int(env)
    cores = _cores()
    return min(cores, max(2, min(4, cores // 2))), cores


# ----------------------------------------------------------------------------- state layout


@dataclass(frozen=True)
class KVLayout:
    """What one sequence's state looks like for a given model and context."""

    n_layer: int
    n_kv_heads: int
    head_dim: int
    v_trans: bool = True

    @property
    def n_embd(self) -> int:
        """Width of one layer's keys (or values) for one cell."""
        return self.n_kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """Width of one virtual token in the PEFT cartridge layout: keys and values of every layer."""
        return self.n_layer * 2 * self.n_embd

    def state_size(self, n_cells: int) -> int:
        """Bytes of the state of one sequence holding `n_cells` cells."""
        header = 4 + 4 + 4 + 4 + n_cells * 12 + 4 + 4
        keys = self.n_layer * (4 + 8 + n_cells * self.n_embd * F16_BYTES)
        values = self.n_layer * ((4 + 4 + 4) if self.v_trans else (4 + 8)) + self.n_layer * n_cells * self.n_embd * F16_BYTES
        return header + keys + values


def hf_to_gguf_order(head_dim: int) -> np.ndarray:
    """Index array `perm` with gguf[..., j] = hf[..., perm[j]]: perm[2i] = i, perm[2i+1] = i + head_dim/2."""
    if head_dim % 2:
        raise LayoutUnsupported(f"head dimension {head_dim} is odd: no RoPE pairing known")
    half = head_dim // 2
    perm = np.empty(head_dim, dtype=np.int64)
    perm[0::2] = np.arange(half)
    perm[1::2] = np.arange(half) + half
    return perm


def gguf_to_hf_order(head_dim: int) -> np.ndarray:
    """The inverse of `hf_to_gguf_order`: hf[..., j] = gguf[..., inv[j]]."""
    return np.argsort(hf_to_gguf_order(head_dim))


def _as_numpy(embeddings) -> np.ndarray:
    if hasattr(embeddings, "detach"):  # torch tensor
        embeddings = embeddings.detach().float().cpu().numpy()
    return np.asarray(embeddings, dtype=np.float32)


def encode_state(embeddings, layout: KVLayout, *, seq_id: int = 0, start_pos: int = 0) -> bytes:
    """The llama.cpp state of one sequence holding the KV in `embeddings` ([p, width], PEFT layout, HF order).

    Cells are at positions start_pos .. start_pos + p - 1, keys after RoPE as stored in the cartridge.
    """
    emb = _as_numpy(embeddings)
    if emb.ndim != 2 or emb.shape[1] != layout.width:
        raise CartridgeMismatch(
            f"cartridge width {emb.shape[1] if emb.ndim == 2 else emb.shape} does not match this model's "
            f"{layout.width} ({layout.n_layer} layers x 2 x {layout.n_kv_heads} heads x {layout.head_dim})"
        )
    p = emb.shape[0]
    if not np.isfinite(emb).all() or np.abs(emb).max() > KV_VALUE_LIMIT:  # float16 cells below
        raise CartridgeMismatch("the cartridge holds NaN or infinite values, or values too large for a KV cache")
    kv = emb.reshape(p, layout.n_layer, 2, layout.n_kv_heads, layout.head_dim)
    keys = kv[:, :, 0][..., hf_to_gguf_order(layout.head_dim)]  # [p, L, H, D] in GGUF order
    values = kv[:, :, 1]  # [p, L, H, D]
    keys16 = keys.astype("<f2")
    values16 = values.astype("<f2")

    parts = [struct.pack("<IiII", STATE_MAGIC, seq_id, 1, p)]
    cells = np.empty((p, 3), dtype="<i4")
    cells[:, 0] = np.arange(start_pos, start_pos + p)
    cells[:, 1] = 1
    cells[:, 2] = seq_id
    parts.append(cells.tobytes())
    parts.append(struct.pack("<II", int(layout.v_trans), layout.n_layer))
    row = layout.n_embd * F16_BYTES
    for layer in range(layout.n_layer):
        parts.append(struct.pack("<iQ", GGML_TYPE_F16, row))
        parts.append(np.ascontiguousarray(keys16[:, layer].reshape(p, layout.n_embd)).tobytes())
    for layer in range(layout.n_layer):
        v = values16[:, layer].reshape(p, layout.n_embd)
        if layout.v_trans:
            parts.append(struct.pack("<iII", GGML_TYPE_F16, F16_BYTES, layout.n_embd))
            parts.append(np.ascontiguousarray(v.T).tobytes())
        else:
            parts.append(struct.pack("<iQ", GGML_TYPE_F16, row))
            parts.append(np.ascontiguousarray(v).tobytes())
    data = b"".join(parts)
    assert len(data) == layout.state_size(p)
    return data


@dataclass
class ParsedState:
    seq_id: int
    positions: np.ndarray  # int32 [n]
    embeddings: np.ndarray  # float32 [n, width], PEFT layout, HF head-dim order
    v_trans: bool


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.offset = 0

    def take(self, n: int) -> memoryview:
        if self.offset + n > len(self.data):
            raise LayoutUnsupported(
                f"llama.cpp state ends after {len(self.data)} bytes, expected at least {self.offset + n}"
            )
        out = self.data[self.offset:self.offset + n]
        self.offset += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def decode_state(data: bytes, layout: KVLayout) -> ParsedState:
    """Parse one sequence's state written by llama.cpp; every field is checked against `layout`."""
    r = _Reader(data)
    magic, seq_id, n_stream = r.unpack("<IiI")
    if magic != STATE_MAGIC:
        raise LayoutUnsupported(f"llama.cpp sequence state has magic {magic:#x}, expected {STATE_MAGIC:#x}")
    if n_stream != 1:
        raise LayoutUnsupported(f"llama.cpp sequence state has {n_stream} streams, expected 1")
    (n,) = r.unpack("<I")
    if n == 0:
        if r.offset != len(data):
            raise LayoutUnsupported("llama.cpp state of an empty sequence has trailing bytes")
        return ParsedState(seq_id, np.zeros(0, np.int32), np.zeros((0, layout.width), np.float32), layout.v_trans)
    cells = np.frombuffer(r.take(12 * n), dtype="<i4").reshape(n, 3)
    if not (cells[:, 1] == 1).all():
        raise LayoutUnsupported("llama.cpp state has cells shared by several sequences (n_seq_id != 1)")
    v_trans, n_layer = r.unpack("<II")
    if n_layer != layout.n_layer:
        raise LayoutUnsupported(f"llama.cpp state has {n_layer} layers, the model has {layout.n_layer}")
    if v_trans not in (0, 1) or bool(v_trans) != layout.v_trans:
        raise LayoutUnsupported(f"llama.cpp state has v_trans={v_trans}, expected {int(layout.v_trans)}")
    row = layout.n_embd * F16_BYTES
    kv = np.empty((n, layout.n_layer, 2, layout.n_kv_heads, layout.head_dim), dtype=np.float32)
    inverse = gguf_to_hf_order(layout.head_dim)
    for layer in range(layout.n_layer):
        k_type, k_row = r.unpack("<iQ")
        if k_type != GGML_TYPE_F16 or k_row != row:
            raise LayoutUnsupported(
                f"llama.cpp keys of layer {layer}: type {k_type} row {k_row} bytes, expected f16 ({GGML_TYPE_F16}) "
                f"rows of {row} bytes"
            )
        k = np.frombuffer(r.take(n * row), dtype="<f2").reshape(n, layout.n_kv_heads, layout.head_dim)
        kv[:, layer, 0] = k[..., inverse]
    for layer in range(layout.n_layer):
        if layout.v_trans:
            v_type, v_el, v_embd = r.unpack("<iII")
            if v_type != GGML_TYPE_F16 or v_el != F16_BYTES or v_embd != layout.n_embd:
                raise LayoutUnsupported(
                    f"llama.cpp values of layer {layer}: type {v_type}, {v_el}-byte elements, width {v_embd}; "
                    f"expected f16, 2, {layout.n_embd}"
                )
            v = np.frombuffer(r.take(n * row), dtype="<f2").reshape(layout.n_embd, n).T
        else:
            v_type, v_row = r.unpack("<iQ")
            if v_type != GGML_TYPE_F16 or v_row != row:
                raise LayoutUnsupported(f"llama.cpp values of layer {layer}: type {v_type} row {v_row} bytes")
            v = np.frombuffer(r.take(n * row), dtype="<f2").reshape(n, layout.n_embd)
        kv[:, layer, 1] = v.reshape(n, layout.n_kv_heads, layout.head_dim)
    if r.offset != len(data):
        raise LayoutUnsupported(f"llama.cpp state has {len(data) - r.offset} unexpected trailing bytes")
    return ParsedState(int(seq_id), cells[:, 0].copy(), kv.reshape(n, layout.width), bool(v_trans))


# ----------------------------------------------------------------------------- threads


class ThreadGovernor:
    """Chooses, call by call, between the configured thread count and one thread.

    ggml's threads meet at a barrier after every operation and spin there (OpenMP's default wait
    policy): when other processes hold the cores (a training run, another job), a descheduled thread
    stalls the others and a call runs far slower than its fair share. Measured on 2 shared cores next
    to two busy processes: 44 prompt tokens in 0.5-7 s with 2 threads, 0.27 s with 1 thread; 0.14 s with
    2 threads on a quiet machine. One thread has no barrier.

    Per batch-size class the governor keeps the fastest time per token seen with full threads and with
    one thread (it runs one call of each class on one thread to learn it). A full-thread call slower
    than `single_margin` x the one-thread best, or `slow_factor` x the full-thread best, counts as
    stalled: one thread takes over for `hold_s` seconds, doubling up to `max_hold_s` while stalls repeat.
    """

    def __init__(self, slow_factor: float = 6.0, single_margin: float = 1.25, min_slow_s: float = 0.05,
                 hold_s: float = 15.0, max_hold_s: float = 240.0):
        self.slow_factor, self.single_margin, self.min_slow_s = slow_factor, single_margin, min_slow_s
        self.base_hold_s, self.max_hold_s, self.hold_s = hold_s, max_hold_s, hold_s
        self.fastest_full: dict[int, float] = {}  # size class -> seconds per token
        self.fastest_single: dict[int, float] = {}
        self.reduced_until = 0.0
        self.fallbacks = 0

    @staticmethod
    def size_class(n_tokens: int) -> int:
        return 0 if n_tokens == 1 else 1 if n_tokens < 32 else 2

    def reduced(self, now: float) -> bool:
        return now < self.reduced_until

    def choose(self, n_tokens: int, now: float) -> bool:
        """True: run this call at the configured threads; False: on one thread."""
        if self.reduced(now):
            return False
        cls = self.size_class(n_tokens)
        return not (cls in self.fastest_full and cls not in self.fastest_single)

    def observe(self, n_tokens: int, seconds: float, now: float, full: bool = True) -> bool:
        """Record a call (`full`: at the configured threads); True when it stalled and one thread takes over."""
        cls = self.size_class(n_tokens)
        per_token = seconds / max(1, n_tokens)
        table = self.fastest_full if full else self.fastest_single
        table[cls] = min(per_token, table.get(cls, per_token))
        if not full or seconds < self.min_slow_s:
            return False
        single = self.fastest_single.get(cls)
        stalled = per_token > self.slow_factor * self.fastest_full[cls] or (
            single is not None and per_token > self.single_margin * single)
        if not stalled:
            self.hold_s = self.base_hold_s
            return False
        self.reduced_until = now + self.hold_s
        self.hold_s = min(self.max_hold_s, self.hold_s * 2)
        self.fallbacks += 1
        return True


# ----------------------------------------------------------------------------- engine


@dataclass
class GenerationStats:
    tokens: list[int]
    prompt_tokens: int
    ttft_s: float  # from the call to the first new token (prompt evaluation + first step)
    decode_s: float  # time spent producing tokens 2..n
    total_s: float
    stopped: bool = False  # ended on a stop token (not on max_new_tokens or should_stop)
    topk_ids: np.ndarray | None = None  # with `topk`: [one row per chosen token (stop included), k]
    topk_logprobs: np.ndarray | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class LlamaCppEngine:
    """One llama.cpp context over a GGUF model, with a cartridge placed in front of sequence 0.

    Usage:
        engine = LlamaCppEngine()                 # the default model; checks the KV-state layout
        engine.inject(cartridge_embeddings)       # [p, width] fp32, PEFT layout; sequence 0 = the cartridge
        ids = engine.generate(chat_ids(...), max_new_tokens=128, on_token=print)

    Prompt ids must be the exact ids of `engine.engines.models.chat_ids`: nothing is added (no BOS, no template).
    The engine remembers which prompt tokens sit after the cartridge and reuses the longest common prefix
    on the next call (a follow-up turn, or the answer turn after the question turn of self-study).
    """

    def __init__(self, model_path: str | Path | None = None, *, n_ctx: int = 4096, n_batch: int = 512,
                 n_threads: int | None = None, n_threads_batch: int | None = None, n_gpu_layers: int | None = None,
                 adaptive_threads: bool | None = None, check: bool = True):
        if model_path is None:
            from engine.store.paths import default_model_path

            model_path = default_model_path()
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise UserError(f"model file not found: {self.model_path}")
        version = llamacpp_version()
        if version not in KNOWN_VERSIONS:
            raise LayoutUnsupported(
                f"llama-cpp-python {version} is installed; the cartridge writer knows {', '.join(KNOWN_VERSIONS)}"
            )
        L = _llama()
        self._L = L
        self._model = None
        self._ctx = None
        self._batch = None
        if n_gpu_layers is None:
            n_gpu_layers = -1 if gpu_offload_available() else 0
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = int(n_gpu_layers)
        self._model = L.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            raise UserError(f"llama.cpp cannot load {self.model_path.name}: {_take_errors() or 'unknown error'}")
        decode_threads, batch_threads = default_threads()
        threads = int(n_threads or decode_threads)
        threads_batch = int(n_threads_batch or (n_threads if n_threads else batch_threads))
        cparams = L.llama_context_default_params()
        cparams.n_ctx = int(n_ctx)
        cparams.n_batch = int(n_batch)
        cparams.n_ubatch = int(n_batch)
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads_batch
        cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED  # the state layout below needs it off
        cparams.type_k = GGML_TYPE_F16
        cparams.type_v = GGML_TYPE_F16
        cparams.embeddings = False
        cparams.no_perf = True
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise UserError(f"llama.cpp cannot create a context of {n_ctx} tokens: {_take_errors() or 'unknown error'}")
        self._mem = L.llama_get_memory(self._ctx)
        self._vocab = L.llama_model_get_vocab(self._model)
        self.n_ctx = int(L.llama_n_ctx(self._ctx))
        self.n_batch = int(n_batch)
        self.n_threads = threads
        self.n_threads_batch = threads_batch
        if adaptive_threads is None:
            adaptive_threads = os.environ.get("CARTRIDGE_LLAMA_ADAPTIVE_THREADS", "1") != "0"
        self.governor = ThreadGovernor() if adaptive_threads and n_gpu_layers == 0 else None
        self._threads_reduced = False
        self.n_gpu_layers = int(n_gpu_layers)
        self.n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.layout = KVLayout(
            n_layer=int(L.llama_model_n_layer(self._model)),
            n_kv_heads=int(L.llama_model_n_head_kv(self._model)),
            head_dim=self._head_dim(),
            v_trans=True,  # flash attention off
        )
        self.prefix_len = 0  # cartridge cells at 0..prefix_len-1
        self.tokens: list[int] = []  # evaluated token ids after the cartridge
        self._prompt: tuple[list[int], np.ndarray] | None = None  # the last prompt prefilled and its logits
        if check:
            try:
                self.check_layout()
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------------ basics

    @property
    def n_layers(self) -> int:
        return self.layout.n_layer

    @property
    def n_kv_heads(self) -> int:
        return self.layout.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layout.head_dim

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint, as stored in the cartridges made for it (`engine.engines.models.gguf_fingerprint`)."""
        from engine.engines.models import gguf_fingerprint

        return gguf_fingerprint(self.model_path)

    @property
    def n_past(self) -> int:
        """Cells of sequence 0: the cartridge plus the evaluated tokens; the next token sits at this position."""
        return self.prefix_len + len(self.tokens)

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self._L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def _head_dim(self) -> int:
        arch = self._meta("general.architecture") or ""
        key_length = self._meta(f"{arch}.attention.key_length")
        value_length = self._meta(f"{arch}.attention.value_length")
        n_embd = int(self._L.llama_model_n_embd(self._model))
        n_head = int(self._L.llama_model_n_head(self._model))
        head_k = int(key_length) if key_length else n_embd // n_head
        head_v = int(value_length) if value_length else head_k
        if head_k != head_v:
            raise LayoutUnsupported(f"keys ({head_k}) and values ({head_v}) have different head sizes")
        return head_k

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        """Threads for one-token steps and for prompt batches (cheap; takes effect on the next call)."""
        self.n_threads = max(1, int(n_threads))
        self.n_threads_batch = max(1, int(n_threads_batch or n_threads))
        self._L.llama_set_n_threads(self._ctx, self.n_threads, self.n_threads_batch)
        self._threads_reduced = False

    def _threads_for_call(self, n_tokens: int) -> bool | None:
        """Apply the governor before a llama_decode: None when it does not apply to this call, else
        whether the call runs at the configured (multi-)thread count."""
        if self.governor is None or (self.n_threads if n_tokens == 1 else self.n_threads_batch) <= 1:
            return None
        full = self.governor.choose(n_tokens, time.perf_counter())
        if full == self._threads_reduced:
            threads = (self.n_threads, self.n_threads_batch) if full else (1, 1)
            self._L.llama_set_n_threads(self._ctx, *threads)
            self._threads_reduced = not full
        return full

    def eos_ids(self) -> set[int]:
        """The model's end-of-generation tokens (EOS, EOT)."""
        out = set()
        for fn in (self._L.llama_vocab_eos, self._L.llama_vocab_eot):
            token = int(fn(self._vocab))
            if token >= 0:
                out.add(token)
        return out

    def close(self) -> None:
        L = getattr(self, "_L", None)
        if L is None:
            return
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            L.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ state

    def clear(self) -> None:
        """Empty sequence 0 (no cartridge, no tokens)."""
        self._L.llama_memory_clear(self._mem, True)
        self.prefix_len = 0
        self.tokens = []
        self._prompt = None

    def truncate(self, n_tokens: int) -> None:
        """Keep the cartridge and the first `n_tokens` evaluated tokens; drop the rest of sequence 0."""
        n_tokens = max(0, min(n_tokens, len(self.tokens)))
        if n_tokens == len(self.tokens):
            return
        if not self._L.llama_memory_seq_rm(self._mem, 0, self.prefix_len + n_tokens, -1):
            raise RuntimeError("llama.cpp could not truncate sequence 0")
        del self.tokens[n_tokens:]
        if self._prompt is not None and n_tokens < len(self._prompt[0]):
            self._prompt = None

    def read_state(self) -> bytes:
        """The raw llama.cpp state of sequence 0."""
        size = int(self._L.llama_state_seq_get_size(self._ctx, 0))
        buf = (ctypes.c_uint8 * max(size, 1))()
        written = int(self._L.llama_state_seq_get_data(self._ctx, buf, size, 0))
        if written != size:
            raise LayoutUnsupported(f"llama.cpp wrote {written} state bytes, announced {size}")
        return bytes(buf)[:size]

    def write_state(self, data: bytes, *, prefix_len: int, tokens: Iterable[int] = ()) -> None:
        """Replace sequence 0 with a raw state; refused states leave the sequence empty."""
        buf = (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(data if data else b"\0")
        _take_errors()
        self._prompt = None
        read = int(self._L.llama_state_seq_set_data(self._ctx, buf, len(data), 0))
        if read != len(data):
            self.prefix_len, self.tokens = 0, []
            self._L.llama_memory_seq_rm(self._mem, 0, -1, -1)
            detail = _take_errors()
            raise LayoutUnsupported(
                f"llama.cpp refused the cartridge state ({read} of {len(data)} bytes read"
                + (f": {detail}" if detail else "") + ")"
            )
        self.prefix_len = int(prefix_len)
        self.tokens = list(tokens)

    def read_kv(self) -> np.ndarray:
        """The KV of every cell of sequence 0 as a cartridge tensor ([n, width] fp32, PEFT layout, HF order)."""
        parsed = decode_state(self.read_state(), self.layout)
        if not np.array_equal(parsed.positions, np.arange(len(parsed.positions))):
            raise LayoutUnsupported("sequence 0 does not hold positions 0..n-1 in order")
        return parsed.embeddings

    def check_layout(self) -> None:
        """Check that this llama.cpp writes states exactly as `encode_state` does; LayoutUnsupported if not.

        Evaluates three tokens, compares the announced state size with the computed one, parses every
        field, re-encodes the parsed KV and expects the very same bytes, and writes them back.
        """
        self.clear()
        probe = [int(self._L.llama_vocab_bos(self._vocab))]
        probe = [t if 0 <= t < self.n_vocab else 0 for t in probe] + [min(17, self.n_vocab - 1), min(42, self.n_vocab - 1)]
        try:
            self.eval(probe)
            size = int(self._L.llama_state_seq_get_size(self._ctx, 0))
            want = self.layout.state_size(len(probe))
            if size != want:
                raise LayoutUnsupported(
                    f"llama-cpp-python {llamacpp_version()}: sequence state of {len(probe)} tokens is {size} bytes, "
                    f"the known layout gives {want} (n_layer={self.layout.n_layer}, n_kv_heads={self.layout.n_kv_heads}, "
                    f"head_dim={self.layout.head_dim}, f16, v_trans=1)"
                )
            data = self.read_state()
            parsed = decode_state(data, self.layout)
            if list(parsed.positions) != list(range(len(probe))) or parsed.seq_id != 0:
                raise LayoutUnsupported("llama.cpp state cells are not the probe's positions 0..2 of sequence 0")
            again = encode_state(parsed.embeddings, self.layout)
            if again != data:
                raise LayoutUnsupported("re-encoding llama.cpp's own state does not give the same bytes")
            self.clear()
            self.write_state(again, prefix_len=len(probe))
            if self.read_state() != data:
                raise LayoutUnsupported("a written state does not read back identically")
        finally:
            self.clear()

    def prefix_from_tokens(self, ids: list[int]) -> int:
        """Make sequence 0 the KV of real tokens `ids` at positions 0.. (what a text-initialised cartridge holds).

        Later prompts continue after it, exactly as after `inject`; returns its length.
        """
        self.clear()
        self.eval(ids)
        self.prefix_len, self.tokens = len(self.tokens), []
        self._prompt = None
        return self.prefix_len

    def inject(self, embeddings, warm_ids: list[int] | None = None) -> int:
        """Make sequence 0 the cartridge `embeddings` ([p, width], composed or not); returns p.

        The conversation then continues at position p, like the torch path (cache length = first position).
        `warm_ids` (e.g. `template_prefix_ids(tokenizer)`, the chat template's head that every prompt starts
        with) are evaluated right away after the cartridge, so the first reply only pays for the new tokens.
        """
        emb = _as_numpy(embeddings)
        p = int(emb.shape[0]) if emb.ndim == 2 else 0
        if p < 1:
            raise CartridgeMismatch("the cartridge holds no virtual tokens")
        if p >= self.n_ctx:
            raise UserError(f"the cartridge has {p} tokens but the llama.cpp context holds {self.n_ctx}")
        data = encode_state(emb, self.layout)
        self.clear()
        self.write_state(data, prefix_len=p)
        if warm_ids:
            self.eval(list(warm_ids))
        return p

    # ------------------------------------------------------------------ evaluation

    def _decode(self, ids: list[int], start: int, want: str) -> np.ndarray | None:
        """Evaluate `ids` at positions start.. in sequence 0; returns logits ('last': [vocab], 'all': [n, vocab])."""
        L = self._L
        n_vocab = self.n_vocab
        out_rows = [] if want == "all" else None
        last = None
        for lo in range(0, len(ids), self.n_batch):
            chunk = ids[lo:lo + self.n_batch]
            batch = self._batch
            final = lo + len(chunk) == len(ids)
            for i, token in enumerate(chunk):
                batch.token[i] = int(token)
                batch.pos[i] = start + lo + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (want == "all" or (want == "last" and final and i == len(chunk) - 1)) else 0
            batch.n_tokens = len(chunk)
            full = self._threads_for_call(len(chunk))
            t0 = time.perf_counter()
            rc = int(L.llama_decode(self._ctx, batch))
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}): {_take_errors() or 'no detail'}")
            if full is not None:
                L.llama_synchronize(self._ctx)
                t1 = time.perf_counter()
                self.governor.observe(len(chunk), t1 - t0, t1, full=full)
            if want == "all":
                ptr = L.llama_get_logits(self._ctx)
                out_rows.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), n_vocab)).copy())
            elif want == "last" and final:
                ptr = L.llama_get_logits_ith(self._ctx, -1)
                last = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
        if want == "all":
            return np.concatenate(out_rows) if out_rows else np.zeros((0, n_vocab), np.float32)
        return last

    def eval(self, ids: list[int], *, all_logits: bool = False) -> np.ndarray:
        """Append `ids` to sequence 0; returns the last position's logits, or every position's with all_logits."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("nothing to evaluate")
        if self.n_past + len(ids) > self.n_ctx:
            raise UserError(
                f"the conversation needs {self.n_past + len(ids):,} positions but the llama.cpp context holds "
                f"{self.n_ctx:,}: start a new chat"
            )
        logits = self._decode(ids, self.n_past, "all" if all_logits else "last")
        self.tokens.extend(ids)
        return logits

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Make sequence 0 hold cartridge + `ids`, reusing the longest common prefix; returns the last logits.

        The same prompt again (a regenerated answer, a repeated question) reuses its saved logits: evaluating
        its last token alone would round differently from the batch it was first evaluated in, and a greedy
        answer could change with what the engine happened to hold.
        """
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("empty prompt")
        if self._prompt is not None and self._prompt[0] == ids and self.tokens[:len(ids)] == ids:
            self.truncate(len(ids))
            return self._prompt[1].copy()
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # the last prompt token is re-evaluated for its logits
        self.truncate(common)
        logits = self.eval(ids[common:])
        self._prompt = (ids, logits.copy())
        return logits

    def next_token_logits(self, prompt_ids: list[int]) -> np.ndarray:
        """Logits [vocab] (float32) for the token after cartridge + `prompt_ids`."""
        return self.prefill(prompt_ids)

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                 stop_ids: set[int] | None = None, on_token: Callable[[int], None] | None = None, *,
                 rng: np.random.Generator | None = None, should_stop: Callable[[], bool] | None = None,
                 guard=None) -> list[int]:
        """Decode after cartridge + `prompt_ids`; greedy at temperature 0, else sampled from softmax(logits / T).

        Streams every kept token to `on_token`. A `engine.engines.decoding.LoopGuard`
        bans the tokens it lists and ends the answer once it loops (the caller keeps `guard.kept()`).
        """
        return self._generate(prompt_ids, max_new_tokens, temperature, stop_ids, on_token, rng, should_stop,
                              guard).tokens

    def timed_generate(self, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                       stop_ids: set[int] | None = None, on_token: Callable[[int], None] | None = None, *,
                       rng: np.random.Generator | None = None) -> GenerationStats:
        """`generate` with time to first token and decode speed."""
        return self._generate(prompt_ids, max_new_tokens, temperature, stop_ids, on_token, rng, None)

    def generate_stats(self, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                       stop_ids: set[int] | None = None, on_token: Callable[[int], None] | None = None, *,
                       rng: np.random.Generator | None = None, should_stop: Callable[[], bool] | None = None,
                       guard=None, topk: int = 0) -> GenerationStats:
        """`generate` returning the full GenerationStats (tokens, timings, whether a stop token ended it).

        With `topk`, the stats also hold the top-k log-probabilities of the logits each token was chosen from
        (a stop token's too), computed here: in the worker process, with no round trip per token."""
        return self._generate(prompt_ids, max_new_tokens, temperature, stop_ids, on_token, rng, should_stop,
                              guard, topk)

    def _generate(self, prompt_ids, max_new_tokens, temperature, stop_ids, on_token, rng, should_stop,
                  guard=None, topk: int = 0) -> GenerationStats:
        if stop_ids is None:
            stop_ids = self.eos_ids()
        if temperature > 0 and rng is None:
            rng = np.random.default_rng()
        start = time.perf_counter()
        out: list[int] = []
        first_at = None
        ids_rows: list[np.ndarray] = []
        lp_rows: list[np.ndarray] = []
        if max_new_tokens <= 0:
            return GenerationStats([], len(prompt_ids), 0.0, 0.0, 0.0, False, *stack_topk(ids_rows, lp_rows, topk))
        logits = self.prefill(prompt_ids)
        stopped = False
        for step in range(max_new_tokens):
            if guard is not None and (banned := guard.banned()):
                logits[banned] = -np.inf
            token = sample(logits, temperature, rng)
            if topk:
                ids, lp = topk_logprobs(logits, topk)
                ids_rows.append(ids)
                lp_rows.append(lp)
            if first_at is None:
                first_at = time.perf_counter()
            ended = accept(token, out, stop_ids, on_token, guard)
            if ended == "stop":
                stopped = True
                break
            if ended or step == max_new_tokens - 1 or (should_stop is not None and should_stop()):
                break
            logits = self.eval([token])
        end = time.perf_counter()
        first_at = first_at or end
        return GenerationStats(out, len(prompt_ids), first_at - start, end - first_at, end - start, stopped,
                               *stack_topk(ids_rows, lp_rows, topk))


def sample(logits: np.ndarray, temperature: float, rng: np.random.Generator | None) -> int:
    """Greedy (temperature 0) or a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    cdf = np.cumsum(np.exp(z - z.max()), dtype=np.float64)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + float(np.log(np.exp(x - np.float32(m)).sum(dtype=np.float64)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    return x - np.float32(_logsumexp(x))


def topk_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[k], log-probs float32[k]) of the k most likely tokens, most likely first.

    Log-probabilities are over the full vocabulary (log_softmax), like the torch teacher's.
    """
    x = np.asarray(logits, dtype=np.float32)
    k = min(k, x.shape[0])
    idx = np.argpartition(x, x.shape[0] - k)[-k:]
    idx = idx[np.argsort(-x[idx], kind="stable")]
    return idx.astype(np.int32), x[idx] - np.float32(_logsumexp(x))


def template_prefix_ids(tokenizer) -> list[int]:
    """The token ids every chat prompt starts with (template head, default system prompt, user header).

    Found as the common prefix of two rendered prompts, so it follows whatever template the model has.
    """
    from engine.engines.models import chat_ids

    a = chat_ids(tokenizer, [{"role": "user", "content": "a"}], add_generation_prompt=True)
    b = chat_ids(tokenizer, [{"role": "user", "content": "Zz 9"}], add_generation_prompt=True)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def cartridge_layout_for(lm) -> KVLayout:
    """The KV layout a torch LoadedModel implies (to compare with an engine's before injecting)."""
    return KVLayout(n_layer=lm.n_layers, n_kv_heads=lm.n_kv_heads, head_dim=lm.head_dim, v_trans=True)
