"""``corolla demo``: a private swarm of the bundled SmolLM2 on this machine answers a chat prompt."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from corolla.cli.flags import parse_flags

DEFAULT_PROMPT = "What are three good reasons to learn a second language? Answer briefly."


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Start one bootstrap peer and a few servers (each hosting an even share of the model's blocks) as separate
    processes on loopback, answer a chat prompt through them, then shut everything down."""

    model: str = "smollm2-135m"
    """model to serve (bundled short name or folder)"""
    servers: int = 3
    """number of servers (blocks split evenly)"""
    prompt: str = DEFAULT_PROMPT
    """the user's chat message"""
    max_new_tokens: int = 64
    """tokens to generate"""
    keep_serving: bool = False
    """after the answer, keep the swarm running with the OpenAI-compatible API and the health page (prints their
    URLs; Ctrl-C stops everything)"""
    api_port: int = 8000
    """the API's and page's port with --keep-serving (0: any free port)"""

    def __post_init__(self):
        for name in ("servers", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def _even_spans(num_blocks: int, num_servers: int) -> list[str]:
    bounds = [round(i * num_blocks / num_servers) for i in range(num_servers + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def run(argv: Sequence[str], *, command: str = "demo") -> int:
    args = parse_flags(DemoConfig, argv, prog="corolla demo")
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from corolla import AutoDistributedModelForCausalLM
    from corolla.local_swarm import LocalSwarm
    from corolla.models.checkpoint import resolve_checkpoint

    print(f"[demo] Preparing {args.model} (converted once, then cached)...", flush=True)
    folder = resolve_checkpoint(args.model).folder
    num_blocks = AutoConfig.from_pretrained(folder).num_hidden_layers
    spans = _even_spans(num_blocks, args.servers)
    log_dir = Path(tempfile.mkdtemp(prefix="corolla-demo-logs-"))
    print(f"[demo] Starting a bootstrap peer and {len(spans)} servers ({', '.join(spans)}); logs in {log_dir}")
    started = time.perf_counter()
    with LocalSwarm(model=args.model, spans=spans, log_dir=log_dir) as swarm:
        print(f"[demo] Swarm ready in {time.perf_counter() - started:.1f} s; bootstrap: {swarm.initial_peers[0]}")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # the demo prints the route itself; keep the client's lifecycle logs from splitting the streamed answer
        logging.getLogger("corolla.client").setLevel(logging.WARNING)
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        messages = [{"role": "user", "content": args.prompt}]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        blocks = model.remote_blocks
        print("[demo] Servers and the blocks they host:")
        for peer_id, info in sorted(blocks.swarm.servers.items(), key=lambda item: item[1].start_block):
            print(
                f"         {peer_id.to_base58()}  blocks {info.start_block}:{info.end_block}  "
                f"({info.inference_rps or 0:.0f} steps/s per block)"
            )
        print(f"\nuser> {args.prompt}\nassistant> ", end="", flush=True)
        streamer = _TimingStreamer(tokenizer)
        with torch.inference_mode(), model.inference_session(max_length=ids.shape[1] + args.max_new_tokens) as sess:
            t0 = time.perf_counter()
            out = model.generate(
                ids, session=sess, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer
            )
            elapsed = time.perf_counter() - t0
            route = " -> ".join(f"{hop.peer_id[-8:]}[{hop.start}:{hop.end}]" for hop in sess.route)
        new_tokens = out.shape[1] - ids.shape[1]
        print(f"\n[demo] Route used: {route}")
        print(
            f"[demo] {new_tokens} tokens in {elapsed:.2f} s = {new_tokens / elapsed:.1f} tokens/s "
            f"(first token after {streamer.first_token_s(t0):.2f} s)"
        )
        model.shutdown()
        if args.keep_serving:
            _keep_serving(swarm, args.api_port)
        print("[demo] Shutting the swarm down...")
    print("[demo] Done: all processes stopped.")
    return 0


def _keep_serving(swarm, port: int) -> None:
    """Run `corolla api --monitor` on the swarm and wait for Ctrl-C (or for a process of the swarm to exit)."""
    base = swarm.start_api(extra_args=["--port", str(port), "--monitor"]).removesuffix("/v1")
    print(f"\n[demo] OpenAI-compatible API: {base}/v1   (e.g. curl {base}/v1/models)")
    print(f"[demo] Swarm health page:      {base}/")
    print(f"[demo] Python or `corolla chat`: --initial-peers {' '.join(swarm.initial_peers)}")
    print("[demo] Serving until Ctrl-C...", flush=True)
    try:
        while all(process.poll() is None for process in swarm.processes.values()):
            time.sleep(1)
        print("[demo] A process of the swarm exited; stopping.")
    except KeyboardInterrupt:
        print()


class _TimingStreamer:
    """Prints tokens as they arrive (via transformers' TextStreamer) and notes when the first one came."""

    def __init__(self, tokenizer):
        from transformers import TextStreamer

        self._inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._first: float | None = None
        self._calls = 0

    def put(self, value):
        self._calls += 1
        if self._calls == 2 and self._first is None:  # the first call carries the prompt
            self._first = time.perf_counter()
        self._inner.put(value)

    def end(self):
        self._inner.end()

    def first_token_s(self, t0: float) -> float:
        return (self._first or time.perf_counter()) - t0
