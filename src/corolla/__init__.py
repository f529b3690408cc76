"""corolla: run, fine-tune and train large language models on a swarm of computers that nobody fully controls."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "AutoDistributedModelForCausalLM": "corolla.client.model",
    "AutoDistributedModelForSequenceClassification": "corolla.client.model",
    "RemoteSequential": "corolla.client.remote_sequential",
}


def __getattr__(name: str):
    # Imports torch/transformers/hivemind only when a client class is first used, so `import corolla` stays cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'corolla' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
