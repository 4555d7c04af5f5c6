"""Serving: a BentoML service with an OpenAI-compatible API over one base model and many adapters.

Grouped by role (only `service` imports bentoml; nothing imports `service`):
  service.py     BentoML entry point: reads the environment, builds the backend, mounts the API
  launcher.py    starts `bentoml serve` as a subprocess (tests, demo, `lorafleet serve`)
  settings.py    ServiceSettings: the service's knobs, nesting the engine's and the PEFT runner's configs
  backend.py     the composition root: picks a generator, builds the catalogue and the registry poller
  metrics.py     Prometheus metrics of requests, the engine and the adapter cache
  api/           HTTP: OpenAI routes and schema, admin routes, keys and hosts, body limit, SSE framing
  catalogue/     the adapter catalogue: `model` strings, registry versions, local folders, champion polling
  generation/    the engine front: the generator interface and its two implementations
  engine/        pure PyTorch continuous batching (no service code)
Registry reads live in `lorafleet/registry_read.py`, shared with the pipeline's `tasks/registry.py`.
"""
