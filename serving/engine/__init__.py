"""The serving engine: pure PyTorch continuous batching of many LoRA adapters on one base model.

No bentoml, prefect, mlflow or fastapi imports here: the engine must be usable from a notebook or
another server (the service wraps it at the boundary).
"""
