"""Domain exceptions. Each message says what happened and what to do next."""

from __future__ import annotations


class CorollaError(Exception):
    """Base class of corolla's errors."""


class ModelNotFoundError(CorollaError):
    """A model name could not be resolved to a checkpoint."""


class BundledModelMissingError(ModelNotFoundError):
    """The package that ships the bundled model is not installed."""


class UnsupportedModelError(CorollaError):
    """The checkpoint's architecture is not one corolla can serve."""


class MissingBlocksError(CorollaError):
    """No server in the swarm hosts some of the model's blocks."""

    def __init__(self, missing: list[tuple[int, int]], model_name: str = "MODEL"):
        self.missing = missing
        ranges = ", ".join(f"{a}:{b}" for a, b in missing)
        super().__init__(
            f"No server in the swarm hosts blocks {ranges} of {model_name}. Start a server for them, e.g. "
            f"`corolla serve {model_name} --blocks {missing[0][0]}:{missing[0][1]} --initial-peers ...`, "
            f"or check that --initial-peers and --dht-prefix point at the right swarm."
        )


class MissingAdapterError(MissingBlocksError):
    """No server in the swarm hosts some blocks with the adapter the client selected."""

    def __init__(self, missing: list[tuple[int, int]], model_name: str, adapter: str, available: list[str]):
        self.missing, self.adapter = missing, adapter
        ranges = ", ".join(f"{a}:{b}" for a, b in missing)
        others = f"Adapters served now: {', '.join(available)}. " if available else "No server serves adapters now. "
        CorollaError.__init__(
            self,
            f"No server in the swarm hosts blocks {ranges} of {model_name} with adapter {adapter!r}. {others}"
            f"Start servers holding it, e.g. `corolla serve {model_name} --adapters {adapter}=PATH_TO_ADAPTER "
            f"--blocks {missing[0][0]}:{missing[0][1]} --initial-peers ...`, or pick another active_adapter "
            f"(None for the base model).",
        )


class AdapterError(CorollaError):
    """A LoRA adapter a server was asked to load is missing, malformed or does not fit the model."""


class SwarmConnectionError(CorollaError):
    """Could not reach the initial peers of a swarm."""


class RemoteCallError(CorollaError):
    """A server refused or failed a request."""


class UnsignedAnswerError(RemoteCallError):
    """A server's answer lacked a valid signature over what was asked and answered (a verifying client refuses it
    and never uses that server again: libp2p already protects the bytes in transit, so the server sent it so)."""


class ServerBusyError(RemoteCallError):
    """A server had no attention-cache room for a session within its allocation timeout."""


class InvalidRequestError(CorollaError):
    """A request that a server refuses because it is malformed or over a limit (raised server-side)."""
