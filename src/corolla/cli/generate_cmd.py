"""``corolla generate`` and ``corolla chat``: text through a swarm, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hub repo id, local checkpoint folder, or bundled short name (smollm2-135m)")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of peers in the swarm")
    parser.add_argument("--dht-prefix", default=None, help="DHT namespace of the model (default: from its name)")
    parser.add_argument(
        "--active-adapter", default=None, help="a LoRA adapter served with `corolla serve --adapters` (its name)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    parser.add_argument(
        "--verbose", action="store_true", help="log the client's routes (they would interleave with the text)"
    )


def register(commands) -> None:
    generate = commands.add_parser(
        "generate", help="generate text through a swarm", description="Generate a continuation through a swarm."
    )
    _add_common(generate)
    generate.add_argument("--prompt", required=True, help="the prompt text")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.set_defaults(handler=run_generate)
    chat = commands.add_parser(
        "chat", help="interactive chat through a swarm", description="Chat; the servers keep the conversation cache."
    )
    _add_common(chat)
    chat.add_argument("--max-length", type=int, default=2048, help="longest conversation, in tokens")
    chat.set_defaults(handler=run_chat)


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
    return kwargs


def _load(args):
    import logging

    from transformers import AutoTokenizer

    from corolla import AutoDistributedModelForCausalLM
    from corolla.models.checkpoint import resolve_checkpoint

    if not args.verbose:  # warnings (a failed server, a retry) still show
        logging.getLogger("corolla.client").setLevel(logging.WARNING)
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(args.model).folder)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, dht_prefix=args.dht_prefix, active_adapter=args.active_adapter
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
    model.generate(ids, streamer=streamer, **_sampling(args))
    return 0


def run_chat(args) -> int:
    from transformers import TextStreamer

    tokenizer, model = _load(args)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
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
            model.generate(ids, session=session, streamer=streamer, **_sampling(args))
            first = False
    return 0
