"""``corolla generate`` and ``corolla chat``: text through a swarm, streamed to the terminal."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import tyro

from corolla.cli.flags import parse_flags

_MODEL = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
HAS_VERBOSE_FLAG = True  # TextConfig.verbose: `corolla generate --verbose` also logs the routes


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """What ``corolla generate`` and ``corolla chat`` share: the swarm, the model and how to sample."""

    model: _MODEL
    """Hub repo id, local checkpoint folder, or bundled short name (smollm2-135m)"""
    initial_peers: tuple[str, ...]
    """multiaddrs of peers in the swarm"""
    dht_prefix: str | None = None
    """DHT namespace of the model (None: derived from its name)"""
    active_adapter: str | None = None
    """a LoRA adapter served with `corolla serve --adapters` (its name)"""
    max_new_tokens: int = 64
    """tokens to generate per answer"""
    temperature: float = 0.0
    """0 = greedy; > 0 samples"""
    top_p: float | None = None
    """nucleus sampling threshold"""
    top_k: int | None = None
    """sample among the k most likely tokens"""
    repetition_penalty: float | None = None
    """> 1 discourages repeats"""
    verify: float = 0.0
    """share of steps also computed by a second server and compared (0: off, 1: every step); a server caught
    returning wrong values is never used again"""
    prompt_lookup_tokens: int = 0
    """speculative decoding: guess up to this many next tokens from the text so far (prompt lookup) and have the
    servers check them in one step; greedy output is unchanged (0: off)"""
    draft_model: str | None = None
    """speculative decoding with a small local model sharing the tokenizer (bundled short name or checkpoint
    folder) that drafts the next tokens; the swarm checks them in one step"""
    verbose: bool = False
    """log the client's routes (they would interleave with the text) and show tracebacks"""

    def __post_init__(self):
        if self.prompt_lookup_tokens < 0:
            raise ValueError(f"prompt_lookup_tokens must be >= 0, got {self.prompt_lookup_tokens}")
        if self.prompt_lookup_tokens and self.draft_model is not None:
            raise ValueError("use either --prompt-lookup-tokens or --draft-model, not both")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.verify <= 1:
            raise ValueError(f"verify is a share of steps in [0, 1] (0: off, 1: every step), got {self.verify}")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(TextConfig):
    """Generate a continuation of a prompt through a swarm, streamed to the terminal."""

    prompt: str
    """the prompt text"""
    chat: bool = False
    """wrap the prompt in the model's chat template"""


@dataclass(frozen=True, kw_only=True)
class ChatConfig(TextConfig):
    """Chat through a swarm; the servers keep the conversation's attention cache between turns."""

    max_length: int = 2048
    """longest conversation, in tokens"""


def run(argv: Sequence[str], *, command: str = "generate") -> int:
    if command == "chat":
        return run_chat(parse_flags(ChatConfig, argv, prog="corolla chat"))
    return run_generate(parse_flags(GenerateConfig, argv, prog="corolla generate"))


def _sampling(args) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        kwargs["temperature"] = args.temperature
        if args.top_p is not None:
            kwargs["top_p"] = args.top_p
        if args.top_k is not None:
            kwargs["top_k"] = args.top_k
    if args.repetition_penalty is not None:
        kwargs["repetition_penalty"] = args.repetition_penalty
    if args.prompt_lookup_tokens:
        kwargs["prompt_lookup_num_tokens"] = args.prompt_lookup_tokens
    return kwargs


def _draft(args) -> dict:
    """``assistant_model`` for transformers' generate: the local draft model, if one was named."""
    if args.draft_model is None:
        return {}
    from transformers import AutoModelForCausalLM

    from corolla.models.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(args.draft_model).folder
    return {"assistant_model": AutoModelForCausalLM.from_pretrained(folder).eval()}


def _load(args):
    import logging

    from transformers import AutoTokenizer

    from corolla import AutoDistributedModelForCausalLM
    from corolla.models.checkpoint import resolve_checkpoint

    if not args.verbose:  # warnings (a failed server, a retry) still show
        logging.getLogger("corolla.client").setLevel(logging.WARNING)
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(args.model).folder)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model,
        initial_peers=args.initial_peers,
        dht_prefix=args.dht_prefix,
        active_adapter=args.active_adapter,
        verify=args.verify,
    )
    return tokenizer, model


def run_generate(args) -> int:
    from transformers import TextStreamer

    tokenizer, model = _load(args)
    if args.chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    streamer = TextStreamer(tokenizer, skip_prompt=not args.chat, skip_special_tokens=True)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    model.generate(ids, streamer=streamer, **_sampling(args), **_draft(args))
    return 0


def run_chat(args) -> int:
    from transformers import TextStreamer

    tokenizer, model = _load(args)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    draft = _draft(args)
    print("Chat through the swarm. Empty line or Ctrl-D to quit.", file=sys.stderr)
    with model.inference_session(max_length=args.max_length) as session:
        first = True
        while True:
            try:
                text = input("you> ").strip()
            except EOFError:
                break
            if not text:
                break
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
            if not first and tokenizer.bos_token_id is not None and ids[0, 0] == tokenizer.bos_token_id:
                ids = ids[:, 1:]
            print("model> ", end="", flush=True)
            model.generate(ids, session=session, streamer=streamer, **_sampling(args), **draft)
            first = False
    return 0
