"""The adapter catalogue: what a request's `model` means, which adapter it runs, and where that came from
(a registry version through `lorafleet/registry_read.py`, or a local folder under the allowed roots)."""
