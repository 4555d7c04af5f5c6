"""Serving: a BentoML service with an OpenAI-compatible API over one base model and many adapters.

Layers, outermost first (only `service` imports bentoml; nothing imports `service`):
  service.py        BentoML entry point: reads the environment, builds the backend, mounts the API
  launcher.py       starts `bentoml serve` as a subprocess (tests, demo, `lorafleet serve`)
  openai_api.py     FastAPI routes and OpenAI-shaped errors; completions.py runs and formats one job
  adapters.py       `model` string -> loaded adapter; registry_reader.py reads MLflow (read-only)
  generation.py     the token-level contract (request -> async token stream) any generator implements
  runner.py         today's generator: PEFT multi-adapter batches on one worker thread
"""
