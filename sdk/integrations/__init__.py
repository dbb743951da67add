"""Framework integrations: Lightning, Hugging Face Trainer and Optuna on top of the tracker."""

__all__: list[str] = []
