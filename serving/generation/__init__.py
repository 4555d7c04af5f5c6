"""The engine front: the one generator interface (`interface.py`) and the two generators behind it, the
continuous-batching engine (`engine_generator.py`) and PEFT + `generate` (`runner.py`)."""
