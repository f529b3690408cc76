"""The models the gateway serves: for each, the client half (embeddings, LM head) connected to its swarm, and its
tokenizer. Chosen by name, or found in the swarm's model registry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from corolla.api.config import ApiConfig
from corolla.errors import CorollaError, ModelNotFoundError
from corolla.log import get_logger

logger = get_logger(__name__)


@dataclass(kw_only=True)
class ServedModel:
    """One model behind the API. ``model``: an ``AutoDistributedModelForCausalLM``."""

    name: str
    model: object
    tokenizer: object
    eos_token_ids: tuple[int, ...]
    context_length: int
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def shutdown(self) -> None:
        self.model.shutdown()


def load_models(config: ApiConfig) -> dict[str, ServedModel]:
    """The models named in ``config.models``, or else every model of the swarm's registry whose client weights can be
    found here (the others are skipped with a warning). Raises CorollaError if none can be served."""
    if config.models:
        wanted = [(name, None) for name in config.models]
    else:
        wanted = _registry_models(config)
        if not wanted:
            raise ModelNotFoundError(
                "The swarm announces no models yet. Start a server (`corolla serve MODEL --initial-peers ...`) or "
                "name the models with --models."
            )
    served: dict[str, ServedModel] = {}
    try:
        for name, dht_prefix in wanted:
            try:
                served[name] = load_model(name, config, dht_prefix=dht_prefix)
            except ModelNotFoundError as e:
                if config.models:
                    raise
                logger.warning("Not serving %s (announced by the swarm): %s", name, e)
    except BaseException:
        for model in served.values():
            model.shutdown()
        raise
    if not served:
        raise ModelNotFoundError("None of the swarm's models can be loaded here: " + ", ".join(n for n, _ in wanted))
    return served


def load_model(name: str, config: ApiConfig, *, dht_prefix: str | None = None) -> ServedModel:
    from transformers import AutoTokenizer

    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.models.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(name).folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        name, initial_peers=config.initial_peers, dht_prefix=dht_prefix, verify=config.verify
    )
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    logger.info("Serving %s (%d blocks, context %d tokens)", name, model.config.num_hidden_layers, context)
    return ServedModel(
        name=name, model=model, tokenizer=tokenizer, eos_token_ids=tuple(sorted(eos_ids)), context_length=context
    )


def _registry_models(config: ApiConfig) -> list[tuple[str, str]]:
    """(name, DHT prefix) of every model the swarm's registry announces."""
    from corolla.net.dht_process import client_dht
    from corolla.net.dht_records import fetch_models

    try:
        timeout = config.registry_timeout_s
        dht = client_dht(config.initial_peers, startup_timeout=timeout, bootstrap_timeout=timeout)
    except Exception as e:
        raise CorollaError(
            f"Could not join the swarm through {list(config.initial_peers)} ({type(e).__name__}: {e}). Check the "
            "addresses and that those peers are running."
        ) from e
    try:
        models = fetch_models(dht, timeout_s=config.registry_timeout_s)
    finally:
        dht.shutdown()
    return [(name, entries[0][1].dht_prefix) for name, entries in models.items()]
