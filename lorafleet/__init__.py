"""lorafleet: one shared base model, many small task adapters."""

__version__ = "0.1.0"
