"""llama.cpp in a process of its own: `LlamaCppProcess` has the methods and attributes of a LlamaCppEngine
that lives in a worker process.

The worker imports llama.cpp before anything else (a CUDA build has crashed when numpy or torch was loaded
first) and never loads torch. A crash in native code (a segmentation fault, an illegal instruction) ends
the worker only: the app gets a UserError that names the signal, and the next chat starts a new worker.

Calls go over a local authenticated connection: (method, args, kwargs, callback names) in, the result out. Callbacks
(`on_token`, `should_stop`) are called back in the app's process, one round trip each; the
random generator and the loop guard a call mutates come back with its result and are copied into the
caller's objects, so a call behaves as it does in process.
"""

from __future__ import annotations

import os
import pickle
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.errors import UserError

_STATEFUL = ("rng", "guard")  # keyword arguments a call mutates: sent back with its result
_START_TIMEOUT_S = 120


class LlamaCppCrashed(UserError):
    """The llama.cpp worker process died (native crash or killed)."""


def _plain(value):
    """Arguments as the worker can read them without torch: tensors become float32 numpy arrays."""
    if type(value).__module__.startswith("torch"):
        return value.detach().float().cpu().numpy()
    return value


def _signal_name(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class LlamaCppProcess:
    """A LlamaCppEngine (same constructor arguments) in a worker process."""

    def __init__(self, model_path: str | Path | None = None, **kwargs):
        from multiprocessing.connection import Listener

        key = secrets.token_bytes(32)
        self._conn = None
        self._closed = False
        self._lock = threading.RLock()
        listener = Listener(("127.0.0.1", 0), authkey=key)
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
            host, port = listener.address
            self._proc = subprocess.Popen([sys.executable, "-m", "engine.engines.llamacpp_worker", host, str(port)],
                                          stdin=subprocess.PIPE, env=env)
            self._proc.stdin.write(key.hex().encode() + b"\n")
            self._proc.stdin.close()
            accepted: list = []
            thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
            thread.start()
            deadline = time.monotonic() + _START_TIMEOUT_S  # a worker that neither connects nor exits
            while thread.is_alive() and self._proc.poll() is None and time.monotonic() < deadline:
                thread.join(0.1)
            thread.join(0.5)  # it may have connected just before exiting
            if not accepted:
                self._proc.kill()
                raise LlamaCppCrashed(f"the llama.cpp worker did not start ({_signal_name(self._proc.wait())})")
            self._conn = accepted[0]
        finally:
            listener.close()
        try:
            (self._methods, _), _ = self._request(("open", (str(model_path) if model_path is not None else None,), kwargs),
                                             "starting")
        except BaseException:
            self.close()
            raise

    @property
    def alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    # -- plumbing ---------------------------------------------------------------------------------

    def _crashed(self, doing: str) -> LlamaCppCrashed:
        self._closed = True
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        return LlamaCppCrashed(f"llama.cpp crashed while {doing} ({_signal_name(code)}); the app is fine. "
                               "Try again, or use --engine torch")

    def _request(self, message: tuple, doing: str, callbacks: dict | None = None):
        """Send `message` and answer callbacks until the result comes: (result, state, exception a callback
        raised). A callback that raises (a stop, Ctrl-C) unwinds the call in the worker too, so the two
        sides stay in step; anything else that interrupts the exchange ends the worker."""
        if self._closed:
            raise LlamaCppCrashed("the llama.cpp worker is closed")
        raised = None
        with self._lock:
            try:
                self._conn.send(message)
                while True:
                    kind, *rest = self._conn.recv()
                    if kind != "callback":
                        break
                    name, args = rest
                    try:
                        value = callbacks[name](*args)
                    except BaseException as exc:  # noqa: BLE001 - re-raised once the worker has unwound
                        raised = exc
                        self._conn.send(("raise",))
                    else:
                        self._conn.send(("value", value))
            except (EOFError, ConnectionError, OSError):
                raise self._crashed(doing) from None
            except BaseException:  # interrupted mid-exchange: the worker's next message would be out of step
                self._kill()
                raise
        if kind == "error":
            raise pickle.loads(rest[0])
        return rest, raised

    def _call(self, name: str, *args, **kwargs):
        callbacks = {k: v for k, v in kwargs.items() if callable(v) and k not in _STATEFUL}
        sent = {k: _plain(v) for k, v in kwargs.items() if k not in callbacks}
        (result, stateful), raised = self._request(
            ("call", name, tuple(_plain(a) for a in args), sent, tuple(callbacks)), f"running {name}", callbacks)
        for key, value in stateful.items():  # the worker's copies after the call
            mine = kwargs[key]
            if key == "rng":
                mine.bit_generator.state = value.bit_generator.state
            else:
                mine.__dict__.update(value.__dict__)
        if raised is not None:
            raise raised
        return result

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self.__dict__.get("_methods", ()):
            return lambda *args, **kwargs: self._call(name, *args, **kwargs)
        return self._request(("get", name), f"reading {name}")[0][0]

    def _kill(self) -> None:
        self._closed = True
        self._proc.kill()
        self._proc.wait()
        self._conn.close()

    def close(self) -> None:
        if self._closed or self._conn is None:
            return
        self._closed = True
        try:
            self._conn.send(("close",))
            self._proc.wait(timeout=10)
        except (OSError, EOFError, subprocess.TimeoutExpired):
            self._proc.kill()
        finally:
            self._conn.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the worker -------------------------------------------------------------------------------------


class _CallbackRaised(Exception):
    """A callback raised in the app's process: the call unwinds here and the app raises the original."""


def _error(exc: BaseException) -> bytes:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(UserError(f"{type(exc).__name__}: {exc}"))


def _serve(host: str, port: int, key: bytes) -> None:
    from multiprocessing.connection import Client

    from engine.engines.llamacpp import LlamaCppEngine

    conn = Client((host, port), authkey=key)
    engine = None

    def callback(name):
        def call(*args):
            conn.send(("callback", name, args))
            answer = conn.recv()
            if answer[0] == "raise":
                raise _CallbackRaised
            return answer[1]
        return call

    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        kind = message[0]
        try:
            if kind == "close":
                break
            if kind == "open":
                _, args, kwargs = message
                engine = LlamaCppEngine(*args, **kwargs)
                methods = [n for n in dir(LlamaCppEngine) if not n.startswith("_") and callable(getattr(LlamaCppEngine, n))]
                conn.send(("result", methods, {}))
            elif kind == "get":
                conn.send(("result", getattr(engine, message[1])))
            else:
                _, name, args, kwargs, callbacks = message
                kwargs.update({k: callback(k) for k in callbacks})
                try:
                    result = getattr(engine, name)(*args, **kwargs)
                except _CallbackRaised:  # the app re-raises the callback's own exception
                    result = None
                conn.send(("result", result, {k: kwargs[k] for k in _STATEFUL if kwargs.get(k) is not None}))
        except Exception as exc:
            conn.send(("error", _error(exc)))
    if engine is not None:
        engine.close()
    conn.close()


if __name__ == "__main__":
    import llama_cpp  # noqa: F401  (first: before numpy, before anything else)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the app's to handle
    _serve(sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.stdin.readline().strip()))
