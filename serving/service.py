"""The BentoML service: `bentoml serve lorafleet.serving.service:LoraFleetService --port 3000`.

This is the serving entry point, and the only module that imports bentoml or reads the environment
(`Settings.from_env()` + `ServiceSettings.from_env()`). Heavy work (registry reads, model and
adapter loading) happens in `__init__`, which BentoML runs in the worker before `/readyz` answers 200.

The OpenAI API is a FastAPI app mounted with `@bentoml.asgi_app` rather than `@bentoml.api`
endpoints, because BentoML's streaming endpoints do not speak OpenAI's SSE framing. BentoML still
provides `/livez`, `/readyz` and `/metrics` (its own metrics plus `lorafleet_*` from serving/metrics.py).
"""

from __future__ import annotations

import logging
import os

import bentoml

from lorafleet.serving.api.auth import exposure_warnings
from lorafleet.serving.api.openai_api import create_app
from lorafleet.serving.backend import build_backend
from lorafleet.serving.launcher import STARTUP_FAILED
from lorafleet.serving.metrics import ServingMetrics
from lorafleet.serving.settings import ServiceSettings
from lorafleet.settings import Settings

log = logging.getLogger(__name__)

openai_app = create_app()

# Generation can run for minutes on a CPU: BentoML's default 60 s request timeout would cut streams.
REQUEST_TIMEOUT_S = 3600


@bentoml.asgi_app(openai_app, path="/")
@bentoml.service(name="lorafleet", traffic={"timeout": REQUEST_TIMEOUT_S}, workers=1)
class LoraFleetService:
    def __init__(self) -> None:
        try:
            settings = Settings.from_env()
            settings.ensure()
            service_settings = ServiceSettings.from_env(settings, os.environ)
            for warning in exposure_warnings(service_settings):  # before the slow part: seen at once
                log.warning("WARNING: %s", warning)
            self.backend = build_backend(service_settings, metrics=ServingMetrics())
        except Exception as error:
            log.error("%s: %s", STARTUP_FAILED, error)
            raise
        openai_app.state.backend = self.backend
        models = [model.id for model in self.backend.catalogue.models()]
        log.info("lorafleet is serving %s", ", ".join(models))

    def __is_ready__(self) -> bool:
        return openai_app.state.backend is not None

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        openai_app.state.backend = None
        self.backend.close()
