"""Fine-tune SmolLM2-135M through a swarm: prompt tuning + a classification head, trained on this machine.

The client holds only the embeddings, a trainable prompt (``pre_seq_len`` vectors put in front of every input)
and a new classification head; the 30 transformer blocks stay frozen on the servers, which run forward and
backward passes for it. Without ``--initial-peers`` the script starts a local swarm of 3 servers x 10 blocks.

The task is review sentiment (positive / negative). Its data is generated here, offline: sentences from templates,
subjects and adjectives. The held-out split uses adjectives never seen in training, so a good score needs the
pretrained model's knowledge of words, not memorization. Untuned (random prompt and head), accuracy is near
chance; after a short prompt tuning run it should be far above it.

    python examples/finetune_smollm2.py                 # full run (a few minutes on 2 CPU cores)
    python examples/finetune_smollm2.py --steps 5 --eval-size 32 --out /tmp/ft   # a quick check
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from corolla import AutoDistributedModelForSequenceClassification
from corolla.local_swarm import LocalSwarm
from corolla.models.bundled import ensure_bundled_checkpoint

SUBJECTS = [
    "The movie", "This restaurant", "The new phone", "Our hotel room", "The concert", "This book", "The service",
    "The museum tour", "My new laptop", "The coffee", "The hiking trail", "This album", "The train ride",
    "The cooking class", "The video game", "The city park",
]  # fmt: skip
TEMPLATES = [
    "{s} was {a}.", "Honestly, {s} was {a}.", "I think {s} was really {a}.", "{s} turned out to be {a}.",
    "Everyone agreed that {s} was {a}.", "Review: {s} was {a}!",
]  # fmt: skip
POSITIVE = ["wonderful", "excellent", "fantastic", "delightful", "superb", "lovely", "great", "amazing", "brilliant"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "miserable", "disappointing", "bad", "poor"]
HELD_OUT = 3  # adjectives per class kept out of training


def make_data(seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held-out) lists of (sentence, label); held-out sentences use adjectives training never sees."""

    def sentences(positive: list[str], negative: list[str]) -> list[tuple[str, int]]:
        data = []
        for adjectives, label in ((positive, 1), (negative, 0)):
            for s, t, a in itertools.product(SUBJECTS, TEMPLATES, adjectives):
                text = t.format(s=s if t.startswith("{s}") else s.lower(), a=a)
                data.append((text, label))
        random.Random(seed).shuffle(data)
        return data

    train = sentences(POSITIVE[:-HELD_OUT], NEGATIVE[:-HELD_OUT])
    held_out = sentences(POSITIVE[-HELD_OUT:], NEGATIVE[-HELD_OUT:])
    return train, held_out


def batches(data, size: int, tokenizer):
    for i in range(0, len(data) - size + 1, size):
        texts, labels = zip(*data[i : i + size])
        encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
        yield encoded["input_ids"], encoded["attention_mask"], torch.tensor(labels)


@torch.no_grad()
def accuracy(model, data, tokenizer, batch_size: int = 32) -> float:
    correct = total = 0
    for ids, mask, labels in batches(data, batch_size, tokenizer):
        predictions = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        correct += int((predictions == labels).sum())
        total += len(labels)
    return correct / total


def plot(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(args, initial_peers: list[str], path: str) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(args.seed)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        "smollm2-135m",
        initial_peers=initial_peers,
        tuning_mode="ptune",
        pre_seq_len=args.pre_seq_len,
        config_kwargs=dict(num_labels=2, pad_token_id=tokenizer.pad_token_id),
    )
    try:
        for name, parameter in model.named_parameters():  # train only the prompt and the new head
            parameter.requires_grad_("prompt_tuning" in name or name.startswith("score."))
        trainable = [p for p in model.parameters() if p.requires_grad]
        train_data, held_out = make_data(args.seed)
        held_out = held_out[: args.eval_size]
        before = accuracy(model, held_out, tokenizer)
        logging.info("Held-out accuracy before tuning: %.1f %% (%d examples)", 100 * before, len(held_out))

        optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
        losses, started = [], time.perf_counter()
        stream = itertools.cycle(list(batches(train_data, args.batch_size, tokenizer)))
        with tqdm(total=args.steps, desc="prompt tuning", unit="step") as bar:
            for _ in range(args.steps):
                ids, mask, labels = next(stream)
                loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
        seconds = time.perf_counter() - started
        after = accuracy(model, held_out, tokenizer)
        logging.info("Held-out accuracy after tuning: %.1f %%", 100 * after)
    finally:
        model.shutdown()
    return dict(
        accuracy_before=before,
        accuracy_after=after,
        losses=losses,
        train_seconds=seconds,
        steps=args.steps,
        batch_size=args.batch_size,
        pre_seq_len=args.pre_seq_len,
        held_out_examples=len(held_out),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--initial-peers", nargs="*", default=None, help="join this swarm instead of starting one")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pre-seq-len", type=int, default=8, help="length of the trainable prompt")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-size", type=int, default=128, help="held-out examples to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("finetune-output"), help="folder for the plot and results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(1)

    path = str(ensure_bundled_checkpoint("smollm2-135m"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.initial_peers:
        results = train(args, args.initial_peers, path)
    else:
        spans = ["0:10", "10:20", "20:30"]
        with LocalSwarm(model="smollm2-135m", spans=spans, log_dir=args.out / "logs") as swarm:
            results = train(args, swarm.initial_peers, path)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    title = (
        f"SmolLM2 prompt tuning through the swarm\nheld-out accuracy {100 * results['accuracy_before']:.0f}% "
        f"-> {100 * results['accuracy_after']:.0f}%"
    )
    plot(results["losses"], args.out / "loss.png", title)
    print(
        f"held-out accuracy: {100 * results['accuracy_before']:.1f}% before, "
        f"{100 * results['accuracy_after']:.1f}% after {args.steps} steps "
        f"({results['train_seconds']:.0f} s); loss plot: {args.out / 'loss.png'}"
    )


if __name__ == "__main__":
    main()
