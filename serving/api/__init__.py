"""The HTTP layer: FastAPI routes (OpenAI-compatible and admin), request schema, access control, body limit.

It reaches generators only through `serving/generation/interface.py` (never the engine or a concrete
generator: tests/test_structure.py holds it to that) and adapters through the catalogue.
"""
