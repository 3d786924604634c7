"""run_server: uvicorn with a graceful drain on SIGTERM/SIGINT.

On the first signal the server keeps its socket open but answers new ``/v1`` requests
with 503 (and ``/readyz`` with 503, so the load balancer stops sending), lets in-flight
requests finish for up to GUARD_SHUTDOWN_GRACE_S, then exits with status 0. A second
SIGINT forces the exit.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import uvicorn

from guard.api.app import create_app
from guard.api.deps import Services
from guard.loading import load_guarded
from guard.settings import GuardSettings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signal first drains in-flight requests."""

    def __init__(self, config: uvicorn.Config, services: Services, grace_s: float) -> None:
        super().__init__(config)
        self.services = services
        self.grace_s = grace_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Deliberately not recording the signal (uvicorn would re-raise it after shutdown
        # and the process would die by SIGTERM instead of exiting 0).
        if self._draining:
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        log.info("signal %s: draining (grace %.1f s)", sig, self.grace_s)
        self.services.draining = True
        if self.services.engine is not None:
            self.services.engine.close()
        threading.Thread(target=self._drain, name="guard-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while self.services.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.services.in_flight:
            log.warning("grace period over with %d requests in flight", self.services.in_flight)
        self.should_exit = True


def run_server(settings: GuardSettings, host: str, port: int, engine: str = "transformers") -> int:
    """Load model and probe once (a clear error before listening if either is unusable),
    then serve until a signal. ``engine="vllm"`` generates with vLLM (`guard.vllm_engine`,
    in its own venv: ``make install-vllm``), built in the app's lifespan, before listening."""
    if engine == "vllm":
        from guard.vllm_engine import VLLMEngine

        app = create_app(settings, engine_factory=lambda metrics: VLLMEngine(settings, metrics))
    else:
        app = create_app(settings, guarded=load_guarded(settings))
    config = uvicorn.Config(
        app, host=host, port=port, access_log=False, log_config=None,
        timeout_graceful_shutdown=1, lifespan="on",
    )  # fmt: skip
    server = DrainingServer(config, app.state.services, settings.shutdown_grace_s)
    server.run()
    return 0 if server.started else 1
