"""``corolla train MODEL``: push micro-batches through a SWARM's stage peers and report the loss."""

from __future__ import annotations

from collections.abc import Sequence

from corolla.cli.flags import parse_flags
from corolla.training.config import TrainerConfig


def parse(argv: Sequence[str]) -> TrainerConfig:
    return parse_flags(TrainerConfig, argv, prog="corolla train")


def run(argv: Sequence[str], *, command: str = "train") -> int:
    from tqdm import tqdm

    from corolla.training.trainer import Trainer

    config = parse(argv)
    with tqdm(total=config.steps, unit="step", desc="training") as bar:

        def show(report) -> None:
            bar.set_postfix(loss=f"{report.loss:.4f}", sps=f"{report.samples_per_s:.1f}")
            bar.update(1)

        reports = Trainer(config, on_step=show).train()
    if reports:
        last = reports[-1]
        print(
            f"trained {len(reports)} steps: last loss {last.loss:.4f}, {last.samples_per_s:.1f} samples/s", flush=True
        )
    return 0
