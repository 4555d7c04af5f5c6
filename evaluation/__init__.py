"""Quality and speed evaluation of base models and adapters.

Entry points: `quality.evaluate_quality`, `speed.measure_speed`, `generation.generate_texts`,
`metrics.compute_quality` (the project's own offline `evaluate` modules), `parsing.parse_fields`,
and `report` for markdown tables and figures. Submodules are imported explicitly so that importing
the package stays cheap (no torch, no evaluate).
"""
