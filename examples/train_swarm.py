"""Train a language model on real text through a local SWARM: pipeline stages served by peers, one trainer.

The script starts a private swarm on this machine (a bootstrap peer and ``--stages`` x ``--peers-per-stage``
stage peers, each its own process, exactly what ``corolla stage`` runs on other machines) and a trainer that
pushes micro-batches of Python's own help text (it ships with every Python), tokenized with SmolLM2's tokenizer,
through them. Peers of a stage average their gradients with hivemind and step together every
``--samples-per-step`` samples. The loss per step goes to ``loss.jsonl`` and ``loss.png`` in ``--out``.

Models: ``tiny`` (default) is a small Llama (4 blocks, hidden 128) with SmolLM2's tokenizer and vocabulary, from a
random init, so its loss falls visibly within a few minutes on 2 CPU cores; ``smollm2-135m`` continues training the
bundled SmolLM2-135M from its weights (slower: about a second per micro-batch per stage on a laptop CPU).

    python examples/train_swarm.py                              # tiny model, 2 stages x 1 peer, 150 steps
    python examples/train_swarm.py --peers-per-stage 2          # 2 peers per stage, averaging their gradients
    python examples/train_swarm.py --model smollm2-135m --steps 20 --seq-len 64
    python examples/train_swarm.py --steps 5 --out /tmp/swarm   # a quick check

On several machines, run ``corolla dht`` once, then ``corolla stage MODEL --initial-peers ...`` on each peer
(``--stage K`` or let it choose) and ``corolla train MODEL --initial-peers ... --data python-help`` anywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from corolla.local_swarm import LocalSwarm
from corolla.models.bundled import ensure_bundled_checkpoint
from corolla.net.peer_config import PeerConfig
from corolla.training.config import DataConfig, ExperimentConfig, TrainerConfig
from corolla.training.trainer import Trainer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TINY = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, head_dim=32,
)  # fmt: skip


def tiny_model_folder(folder: Path) -> Path:
    """A small Llama config with SmolLM2's tokenizer (its weights come from a random init on every peer)."""
    smollm2 = ensure_bundled_checkpoint("smollm2-135m")
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((smollm2 / "config.json").read_text()) | TINY
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (smollm2 / name).exists():
            shutil.copy(smollm2 / name, folder / name)
    return folder


def plot(reports, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r.step for r in reports], [r.loss for r in reports], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (default), smollm2-135m or a checkpoint folder")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--peers-per-stage", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--samples-per-step", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--wire-compression", default="NONE", help="NONE or UNIFORM_8BIT (activations, grads)")
    parser.add_argument("--out", type=Path, default=Path("examples/train_swarm_out"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="corolla-train-example-"))
    try:
        random_init = args.model == "tiny"
        model = str(tiny_model_folder(scratch / "tiny")) if random_init else args.model
        run = ExperimentConfig(model=model, experiment="example", num_stages=args.stages, random_init=random_init)
        peer_args = ["--experiment", "example", "--num-stages", str(args.stages), "--lr", str(args.lr)]
        peer_args += ["--target-batch-size", str(args.samples_per_step), "--matchmaking-time-s", "1"]
        peer_args += ["--update-period-s", "2"] + (["--random-init"] if random_init else [])
        log_file = args.out / "loss.jsonl"
        log_file.unlink(missing_ok=True)
        with LocalSwarm(model=model, log_dir=args.out / "logs") as swarm:
            names = []
            for stage in range(args.stages):
                for i in range(args.peers_per_stage):
                    names.append(f"stage{stage}-{i}")
                    swarm.start_stage_peer(names[-1], [*peer_args, "--stage", str(stage)])
            swarm.wait_until_stages("example", args.stages, peers=names)
            print(f"{len(names)} stage peers online; training on Python's help text", flush=True)
            config = TrainerConfig(
                run=run,
                network=PeerConfig(initial_peers=tuple(swarm.initial_peers)),
                data=DataConfig(data="python-help", seq_len=args.seq_len, micro_batch_size=args.micro_batch),
                steps=args.steps,
                samples_per_step=args.samples_per_step,
                max_in_flight=4,
                wire_compression=args.wire_compression,
                loss_log=str(log_file),
            )
            started = time.perf_counter()
            reports = Trainer(config).train()
            elapsed = time.perf_counter() - started
        plot(reports, args.out / "loss.png", f"{args.model} through {args.stages} stages x {args.peers_per_stage}")
        first = sum(r.loss for r in reports[:5]) / len(reports[:5])
        last = sum(r.loss for r in reports[-5:]) / len(reports[-5:])
        samples = sum(r.samples for r in reports)
        print(
            f"loss {first:.3f} -> {last:.3f} in {len(reports)} steps ({samples / elapsed:.1f} samples/s); "
            f"plot: {args.out / 'loss.png'}",
            flush=True,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
