"""Running the server: the address bound first (a taken port is one error line), the model loaded
in the background while /health answers 503, uvicorn serving, and SIGINT/SIGTERM ending it
cleanly: no new requests, those running get a grace period to finish and are then cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from typing import Optional

from llmrun.errors import LlmrunError, ServerError
from llmrun.serve.app import Loaded, ServeConfig, ServerState, create_app
from llmrun.serve.translate import ModelLimits

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: one the system picks), or one error line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        raise ServerError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ModelService:
    """Loads the model in a thread of its own (the server answers meanwhile), runs its engine loop,
    and stops both: gracefully on a signal, at once when the server ends."""

    def __init__(self, name: str, options, max_waiting: int, state: ServerState, *, grace_s: float,
                 show_progress: bool):
        self.name, self.options, self.max_waiting, self.grace_s = name, options, max_waiting, grace_s
        self.state, self.show_progress = state, show_progress
        self.error: Optional[BaseException] = None
        self.on_failure = lambda: None   # set by serve(): tells uvicorn to exit
        self._lock = threading.Lock()
        self._loop = self._engine = None
        self._stopped = False
        self._timer: Optional[threading.Timer] = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        threading.Thread(target=self._load, name="llmrun-load", daemon=True).start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    def _load(self) -> None:
        from llmrun.display import note
        from llmrun.engine.loop import EngineLoop
        from llmrun.runtime import open_model

        try:
            started = time.perf_counter()
            opened = open_model(self.name, self.options, show_progress=self.show_progress)
            with self._lock:
                if self._stopped:  # the server ended while the weights loaded
                    opened.engine.close()
                    return
                self._engine = opened.engine
                self._loop = EngineLoop(opened.engine, max_waiting=self.max_waiting)
                self._loop.start()
            engine = opened.engine
            limits = ModelLimits(engine.max_context, engine.decoder.config.vocab_size)
            aliases = tuple({self.name, opened.name, str(opened.path)} - {opened.name})
            self.state.loaded = Loaded(opened.name, aliases, self._loop, engine.tokenizer, limits, int(time.time()))
            note(f"{opened.name} is ready ({time.perf_counter() - started:.1f} s; {engine.plan.dtype}, context "
                 f"{engine.max_context}, {engine.max_num_seqs} sequences at once)")
        except BaseException as err:  # reported by serve() once uvicorn has stopped
            self.error = err
            self.on_failure()

    def begin_shutdown(self) -> None:
        """A signal: refuse new requests, let running ones finish for the grace period, then cancel
        them (a second signal cancels at once)."""
        first = not self.state.shutting_down
        self.state.shutting_down = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.grace_s if first else 0.0, self._cancel_running)
        self._timer.daemon = True
        self._timer.start()

    def _cancel_running(self) -> None:
        with self._lock:
            loop = self._loop
        if loop is not None:
            loop.shutdown(cancel_running=True)

    def stop(self) -> None:
        """Cancel what still runs, stop the loop's thread, release the weights. Idempotent."""
        with self._lock:
            self._stopped = True
            loop, engine, self._loop, self._engine = self._loop, self._engine, None, None
        if self._timer is not None:
            self._timer.cancel()
        if loop is not None:
            loop.shutdown(cancel_running=True)
        if engine is not None:
            engine.close()


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, with our signal handling: a signal starts the graceful shutdown and the
        process then exits normally (uvicorn itself would raise the signal again at the end)."""

        def __init__(self, config, on_signal):
            super().__init__(config)
            self.on_signal = on_signal

        def handle_exit(self, sig, frame) -> None:
            self.on_signal()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def install_signal_handlers(self) -> None:  # uvicorn before capture_signals existed
            if threading.current_thread() is threading.main_thread():
                for sig in HANDLED_SIGNALS:
                    signal.signal(sig, self.handle_exit)

    return Server


def request_log() -> None:
    """One line per request on stderr, with the time."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log = logging.getLogger("llmrun.serve")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def serve(name: str, options, config: ServeConfig, *, host: str, port: int, max_waiting: int,
          grace_s: float) -> None:
    """Serve `name` on host:port until SIGINT/SIGTERM (running requests then get `grace_s` seconds).
    The name is resolved (or pulled) before the port is taken, so a wrong name fails at once; the
    weights load while the server answers."""
    import uvicorn

    from llmrun.display import note, stderr_is_tty
    from llmrun.runtime import present_or_pulled

    source = present_or_pulled(name)
    sock = listening_socket(host, port)
    state = ServerState(config)
    service = ModelService(name, options, max_waiting, state, grace_s=grace_s, show_progress=stderr_is_tty())
    uv_config = uvicorn.Config(create_app(state, service.lifespan), lifespan="on", log_level="warning",
                               access_log=False, timeout_graceful_shutdown=grace_s + 5)
    server = _server_class()(uv_config, service.begin_shutdown)
    service.on_failure = lambda: setattr(server, "should_exit", True)
    request_log()
    note(f"serving {source.name} on {address(sock)} (loading; /health answers 503 until ready)")
    try:
        server.run(sockets=[sock])
    finally:
        service.stop()
        sock.close()
    if isinstance(service.error, LlmrunError):
        raise service.error
    if service.error is not None:
        raise ServerError(f"loading {name} failed: {type(service.error).__name__}: {service.error}")
    note("stopped")
