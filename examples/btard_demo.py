"""Byzantine-tolerant training on this machine: a BTARD-SGD run where some peers attack, and get banned.

The script starts a private swarm (a bootstrap peer and ``--peers`` BTARD peers, each its own process with its own
DHT node and libp2p daemon, exactly what ``corolla btard`` runs on other machines). The peers train an MLP on
scikit-learn's bundled digits; the last ones misbehave as ``--attacks`` says. Every step is a verified butterfly
CenteredClip: commitments, checks of every aggregator along a shared random direction, one validator that
recomputes a peer's gradient from the public data, accusations with signed evidence, bans from the next step.

    python examples/btard_demo.py                                   # 6 peers, 2 attackers, 200 steps (~1 min)
    python examples/btard_demo.py --attacks ipm@30 wrong_aggregate@50,forge@10 silent@80
    python examples/btard_demo.py --peers 4 --attacks none --steps 100

At the end it prints, per peer, its behaviour, when it left (banned or eliminated) and the test accuracy the
honest peers reached. On several machines: ``corolla dht`` once, then ``corolla btard --peers N --initial-peers
...`` on each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from corolla.local_swarm import LocalSwarm, wait_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=6, help="peers in the run, attackers included")
    parser.add_argument(
        "--attacks", nargs="*", default=["sign_flip@20", "wrong_aggregate@60"],
        help="one behaviour per attacking peer (see `corolla btard --help`, --attack)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="folder for the peers' logs and summaries")
    args = parser.parse_args()
    attacks = [a for a in args.attacks if a != "none"]
    if len(attacks) * 2 >= args.peers:
        parser.error(f"{len(attacks)} attackers of {args.peers} peers: BTARD needs fewer than half to be Byzantine")
    out = args.out or Path(tempfile.mkdtemp(prefix="corolla-btard-demo-"))
    behaviours = ["none"] * (args.peers - len(attacks)) + attacks
    names = [f"peer{i}" for i in range(args.peers)]
    print(f"starting {args.peers} peers ({len(attacks)} attacking); logs in {out}")
    with LocalSwarm(model="none", log_dir=out / "logs") as swarm:
        for name, behaviour in zip(names, behaviours):
            flags = ["--peers", str(args.peers), "--steps", str(args.steps), "--attack", behaviour]
            swarm.start_btard_peer(name, [*flags, "--phase-timeout-s", "5", "--result", str(out / f"{name}.json")])
        wait_for(
            lambda: all((out / f"{n}.json").exists() or swarm.processes[n].poll() is not None for n in names),
            timeout_s=60 + args.steps * 2.0,
            what="the peers to finish",
            poll_s=1.0,
        )
    ids = {swarm.peer_ids[n]: n for n in names}
    for name, behaviour in zip(names, behaviours):
        path = out / f"{name}.json"
        if not path.exists():
            print(f"{name:<7} {behaviour:<28} exited without a summary (see {out / 'logs' / (name + '.log')})")
            continue
        result = json.loads(path.read_text())
        left = f"left at step {result['removed_at']}" if result["removed_at"] is not None else "ran every step"
        line = f"{name:<7} {behaviour:<28} {left:<22}"
        if result["removed_at"] is None:
            banned = ", ".join(sorted(ids.get(p, p[-8:]) for p in result["banned"])) or "nobody"
            eliminated = ", ".join(sorted(ids.get(p, p[-8:]) for p in result["eliminated"])) or "nobody"
            line += f" test accuracy {result['accuracy']:.3f}; banned {banned}; eliminated {eliminated}"
        print(line)


if __name__ == "__main__":
    main()
