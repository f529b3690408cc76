"""A server behind NAT serves a client through a relay, in the network lab; the relayed hop's cost vs a direct one.

Hosts (each its own namespace, every link the same one-way delay): ``boot`` (the bootstrap peer and three more
`corolla dht` peers: libp2p reserves relay slots at once when it has four candidates, else after ~3 minutes),
``pub`` (a server of the whole model, directly reachable), ``home`` (a server of the same blocks behind a
masquerading router with no inbound port: it finds out it cannot be dialed and is reached through relays) and
``client`` (this process). The client generates greedy tokens of SmolLM2 through one server at a time
(``allowed_servers``), alternating round by round, checks both against local transformers, and times them; it also
times the info RPC (a round trip) to each server. Calls to the home server are forwarded by the `corolla dht` peers
(``corolla.net.forwarding``); the relays' logs say how many bytes each forwarded inference session moved (past the
128 KiB after which libp2p's own circuits are reset, in both presets).

    sudo .venv/bin/python benchmarks/exp_nat_relay.py --preset smoke --out /tmp/exp
    sudo .venv/bin/python benchmarks/exp_nat_relay.py --preset full            # -> docs/results/nat_relay.*
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.experiment import experiment_parser, machine_line, save_figure  # noqa: E402
from benchmarks.netlab import Lab, LabError, LinkShape, unavailable_reason  # noqa: E402
from benchmarks.results import Run  # noqa: E402
from benchmarks.streamers import FirstTokenClock  # noqa: E402

PRESETS = {
    # bandwidth_s: each of the lab's bandwidth checks (6 pairs of hosts) transfers this long
    "smoke": dict(delay_ms=5, rate_mbit=100, new_tokens=32, rounds=1, pings=5, bandwidth_s=1.0),
    "full": dict(delay_ms=5, rate_mbit=100, new_tokens=32, rounds=5, pings=30, bandwidth_s=2.0),
}
HOSTS = ["boot", "pub", "home", "client"]
MODEL = "smollm2-135m"
PROMPT = "List three things people do at the beach."
RELAYS = 3  # extra `corolla dht` peers besides the bootstrap


def start_swarm(lab: Lab, log_dir: Path):
    from corolla.local_swarm import LocalSwarm

    host_of = {"bootstrap": "boot", "server_pub": "pub", "server_home": "home"}
    host_of |= {f"relay{i}": "boot" for i in range(RELAYS)}

    def process_args(name: str) -> list[str]:
        address = "0.0.0.0" if name == "server_home" else lab.address(host_of[name])
        return ["--host-maddrs", f"/ip4/{address}/tcp/0"]

    swarm = LocalSwarm(
        model=MODEL, command_prefix=lambda name: lab.prefix(host_of[name]), process_args=process_args,
        log_dir=log_dir, start_timeout_s=300,
    )  # fmt: skip
    try:
        swarm.start_bootstrap()
        relays = [swarm.start_dht_peer(f"relay{i}") for i in range(RELAYS)]
        swarm.initial_peers = [*swarm.initial_peers, *(r[0] for r in relays)]  # servers join (and relay) via all
        swarm.start_server("server_pub", ["--blocks", "0:30"])
        swarm.start_server("server_home", ["--blocks", "0:30"])
        swarm.wait_until_served(30, min_servers=2)
    except BaseException:
        swarm.stop()
        raise
    return swarm


def server_records(swarm) -> dict:
    from corolla.models.checkpoint import default_dht_prefix
    from corolla.net.dht_process import client_dht
    from corolla.net.dht_records import collect_servers, fetch_block_records

    dht = client_dht(swarm.initial_peers)
    try:
        records = collect_servers(fetch_block_records(dht, dht_prefix=default_dht_prefix(MODEL), num_blocks=30))
    finally:
        dht.shutdown()
    return {peer.to_base58(): info for peer, info in records.items()}


def client_through(swarm, peer_id: str):
    from corolla import AutoDistributedModelForCausalLM

    return AutoDistributedModelForCausalLM.from_pretrained(
        MODEL, initial_peers=swarm.initial_peers, allowed_servers=(peer_id,), step_timeout_s=60, max_retries=6
    )


def generate(model, ids, new_tokens: int) -> tuple[list[int], float]:
    """(tokens, seconds per token after the first) of greedy generation."""
    import torch

    clock = FirstTokenClock()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    elapsed = time.perf_counter() - clock.first_at
    tokens = out[0, ids.shape[1] :].tolist()
    return tokens, elapsed / max(1, len(tokens) - 1)


def info_rtts(model, peer_id: str, count: int) -> list[float]:
    from corolla.net.loop import run_sync
    from corolla.net.ping import ping

    swarm = model.remote_blocks.swarm
    transport = run_sync(swarm.transport(), timeout_s=30)
    rtts = [run_sync(ping(transport, peer_id, timeout_s=10), timeout_s=20) * 1e3 for _ in range(count)]
    return [rtt for rtt in rtts if math.isfinite(rtt)]  # a failed call counts as missing


def run_experiment(lab: Lab, preset: dict, log_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corolla.models.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(MODEL).folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = local.generate(ids, max_new_tokens=preset["new_tokens"], do_sample=False)[0, ids.shape[1] :].tolist()

    started = time.monotonic()
    swarm = start_swarm(lab, log_dir)
    try:
        served_s = time.monotonic() - started
        records = server_records(swarm)
        home, pub = swarm.peer_ids["server_home"], swarm.peer_ids["server_pub"]
        relayed = {name: records[peer].relayed for name, peer in (("home", home), ("pub", pub))}
        models = {"relayed": client_through(swarm, home), "direct": client_through(swarm, pub)}
        try:
            # round trips first (one unary call each), then generation, alternating paths round by round
            pings = {path: info_rtts(models[path], peer, preset["pings"]) for path, peer in
                     (("relayed", home), ("direct", pub))}  # fmt: skip
            rows, tokens, errors = {"relayed": [], "direct": []}, {}, {}
            for i in range(preset["rounds"]):
                for path in ("relayed", "direct") if i % 2 == 0 else ("direct", "relayed"):
                    if path in errors:
                        continue
                    try:
                        tokens[path], per_token = generate(models[path], ids, preset["new_tokens"])
                    except Exception as e:  # recorded, not hidden
                        errors[path] = f"{type(e).__name__}: {e}"[:500]
                        continue
                    rows[path].append(per_token * 1e3)
        finally:
            for model in models.values():
                model.shutdown()
    finally:
        swarm.stop()
    forwarded = forwarded_sessions(log_dir, home)
    return {
        "forwarded_inference_sessions": len(forwarded),
        "forwarded_session_bytes_max": max(forwarded, default=None),
        "served_after_s": served_s,
        "announced_relayed": relayed,
        "tokens_equal_local": {path: tokens[path] == expected if path in tokens else None for path in rows},
        "generation_errors": errors,
        "rounds_completed": {path: len(v) for path, v in rows.items()},
        "ms_per_token": {path: statistics.median(v) if v else None for path, v in rows.items()},
        "ms_per_token_rounds": rows,
        "info_rtt_ms": {path: statistics.median(v) if v else None for path, v in pings.items()},
        "info_rtt_ms_all": pings,
        "link": {"one_way_delay_ms": preset["delay_ms"], "rate_mbit": preset["rate_mbit"]},
    }


FORWARDED = re.compile(r"Forwarded a stream \S+ -> (\S+) \((\S+)\): (\d+) bytes there, (\d+) back")


def forwarded_sessions(log_dir: Path, peer_id: str) -> list[tuple[int, int]]:
    """(bytes to the server, bytes back) of every inference stream the relays forwarded to ``peer_id``."""
    sessions = []
    for log in sorted(log_dir.glob("*.log")):
        if log.name.startswith(("bootstrap", "relay")):
            for match in FORWARDED.finditer(log.read_text(errors="replace")):
                if match[1] == peer_id and match[2].endswith("/inference"):
                    sessions.append((int(match[3]), int(match[4])))
    return sessions


def _ms(value) -> str:
    return "failed" if value is None else f"{value:.1f}"


def table(r: dict) -> str:
    delay = r["link"]["one_way_delay_ms"]
    lines = [
        f"Every host's link: {delay:g} ms one way, {r['link']['rate_mbit']:g} Mbit/s (so {4 * delay:g} ms RTT "
        "between two hosts; client -> relay -> home server is two such hops).",
        "",
        "| path to the server | announced relayed | tokens equal local | ms per token | info RPC round trip |",
        "|---|---|---|---|---|",
    ]
    for path, host in (("direct", "pub"), ("relayed", "home")):
        lines.append(
            f"| {path} ({host}) | {r['announced_relayed'][host]} | {r['tokens_equal_local'][path]} | "
            f"{_ms(r['ms_per_token'][path])} | {_ms(r['info_rtt_ms'][path])} ms |"
        )
    rtt = r["info_rtt_ms"]
    extra = "unknown" if None in (rtt["relayed"], rtt["direct"]) else f"{rtt['relayed'] - rtt['direct']:.1f} ms"
    most = r.get("forwarded_session_bytes_max")
    lines += [
        "",
        f"The relayed hop adds {extra} per round trip (median of {len(r['info_rtt_ms_all']['relayed'])} info "
        f"calls); the server behind NAT was ONLINE {r['served_after_s']:.0f} s after the swarm's start. Generation "
        "rounds completed: " + ", ".join(f"{path} {n}" for path, n in r["rounds_completed"].items()) + ". "
        f"The relays forwarded {r.get('forwarded_inference_sessions', 0)} inference session(s) to the home server"
        + (
            "."
            if most is None
            else f", the largest moving {most[0] / 1024:.0f} KiB there and {most[1] / 1024:.0f} "
            "KiB back (libp2p's circuits are reset after 128 KiB each way)."
        ),
    ]
    for path, error in r.get("generation_errors", {}).items():
        lines.append(f"Generation through the {path} server failed: `{error[:200]}`.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = experiment_parser(__doc__, PRESETS, log_dir="where the peers' logs go (default: a temp folder)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    reason = unavailable_reason()
    if reason:
        print(f"error: cannot run the network lab here: {reason}", file=sys.stderr)
        return 2
    run = Run("nat_relay", args)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="corolla-exp-nat-relay-"))
    shape = LinkShape(delay_ms=preset["delay_ms"], rate_mbit=preset["rate_mbit"])
    try:
        shapes = {h: shape for h in HOSTS}
        with Lab(hosts=HOSTS, nat_hosts=["home"], shapes=shapes, bandwidth_s=preset["bandwidth_s"]) as lab:
            lab.enter("client")  # this process is the client: its sockets and helpers live in the lab
            results = run_experiment(lab, preset, log_dir)
            # written before the lab is torn down: after that, this process has aborted (a native thread's
            # "std::system_error: Broken pipe") before its plot was drawn
            write_outputs(run, args, preset, results)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def write_outputs(run: Run, args, preset: dict, results: dict) -> None:
    print(json.dumps(results, indent=1))
    text = f"## A server behind NAT through a relay ({args.preset})\n\n- machine: {machine_line(args.machine)}\n\n"
    text += table(results)
    print(text)
    run.path(".md").write_text(text)
    plot(results, run.path(".png"))
    run.save(params=dict(preset, model=MODEL, hosts=HOSTS), results=results)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    paths = ["direct", "relayed"]
    left.bar(paths, [r["ms_per_token"][p] or 0.0 for p in paths], color=["C0", "C1"])  # 0: failed
    left.set_ylabel("ms per token")
    right.bar(paths, [r["info_rtt_ms"][p] or 0.0 for p in paths], color=["C0", "C1"])
    right.set_ylabel("info RPC round trip (ms)")
    fig.suptitle(f"server behind NAT via a relay, links {r['link']['one_way_delay_ms']:g} ms one way", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # everything it started is stopped by now; skip the interpreter's teardown, where a native library's thread
    # aborted once on a closed pipe (SIGABRT after the results were written)
    os._exit(code)
