"""Fault tolerance (the Petals paper's table in miniature): tokens/s of batch-1 greedy generation while servers fail.

Every server of the chain fails with probability ``p`` per step: the failure is injected on the client side, at the
transport level, by a seeded wrapper around ``_ServerStream.step`` that (with probability ``p`` per call, i.e. per
server per step, replays and prefills included) closes that server's inference stream and raises ConnectionError.
The server then really drops the session's attention cache (its stream ended). The swarm is real: a loopback
``LocalSwarm`` with two servers per span, so a replacement always exists. Three strategies:

* ``recovery``  corolla's client as it is: on a failure it bans the server (``ban_timeout_s=0.5``, doubled on each
  repeated failure), routes around it and replays the span's stored inputs to a replacement.
* ``restart``   restarting generation from scratch on any failure (new session, start over; the failed attempts'
  time is wasted). Capped at ``restart_cap_s`` of wall time: a capped run reports the analytic expected time
  t_token * (s**-N - 1) / (1 - s) with s = (1 - p)**servers_in_chain and t_token measured at p = 0 in the same run.
* ``recompute`` recovery without client-side caches: on a failure open a new session and re-feed the whole prefix
  (prompt + tokens generated so far) through every server of the chain, then continue.

``restart`` and ``recompute`` run on a second client with ``max_retries=0`` (the failure surfaces at once, the
script handles it); every run at the same ``p`` uses the same failure seed. A fresh client is made for each
``recovery`` run, so bans do not carry over between runs.

    python benchmarks/exp_fault_tolerance.py --preset smoke --out /tmp/exp
    python benchmarks/exp_fault_tolerance.py --preset full             # -> docs/results/
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tests.fixtures` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from benchmarks.experiment import experiment_parser, machine_line, save_figure  # noqa: E402
from benchmarks.results import Run  # noqa: E402

from corolla import AutoDistributedModelForCausalLM  # noqa: E402
from corolla.client.inference_session import _ServerStream  # noqa: E402
from corolla.errors import CorollaError  # noqa: E402
from corolla.local_swarm import LocalSwarm  # noqa: E402

STRATEGIES = ("recovery", "restart", "recompute")
LABELS = {
    "recovery": "corolla recovery (replay stored inputs)",
    "restart": "restart from scratch",
    "recompute": "recompute prefix (no client cache)",
}
MODELS = {
    # name -> (servers' spans: two servers per span, prompt length)
    "tiny-llama-1span": (["0:6"], 8),
    "tiny-llama": (["0:3", "3:6"], 8),
    "tiny-llama-3spans": (["0:2", "2:4", "4:6"], 8),
    "smollm2-135m": (["0:10", "10:20", "20:30"], 16),
}
PRESETS = {
    "smoke": dict(models={"tiny-llama-1span": 48}, probs=[0.0, 0.05], restart_cap_s=20.0, seed=0),
    # ~10 minutes on a 2-core machine (full: ~30)
    "medium": dict(
        models={"tiny-llama-3spans": 512, "smollm2-135m": 256}, probs=[0.0, 1e-3, 1e-2], restart_cap_s=45.0, seed=0
    ),
    "full": dict(
        models={"tiny-llama-3spans": 1024, "smollm2-135m": 1024}, probs=[0.0, 1e-3, 1e-2], restart_cap_s=120.0, seed=0
    ),
}


class FailureInjector:
    """Wraps ``_ServerStream.step``: with probability ``p`` per call it closes the stream, raises ConnectionError."""

    def __init__(self):
        self.p, self.rng, self.failures, self.calls = 0.0, random.Random(0), 0, 0
        self._original = None

    def install(self) -> None:
        self._original = original = _ServerStream.step
        injector = self

        async def step(stream, *args, **kwargs):
            injector.calls += 1
            if injector.p > 0 and injector.rng.random() < injector.p:
                injector.failures += 1
                await stream.close()  # the server ends the session and frees its cache
                raise ConnectionError(f"injected failure of server {stream.hop.peer_id[-6:]}")
            return await original(stream, *args, **kwargs)

        _ServerStream.step = step

    def uninstall(self) -> None:
        if self._original is not None:
            _ServerStream.step = self._original

    def reset(self, p: float, seed: int) -> None:
        self.p, self.rng, self.failures, self.calls = p, random.Random(seed), 0, 0


class TokenRecorder:
    """A streamer that keeps the generated tokens (the first ``put`` is the prompt)."""

    def __init__(self):
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1))

    def end(self):
        pass


def _generate(model, ids: torch.Tensor, new_tokens: int, recorder: TokenRecorder, max_length: int) -> None:
    with model.inference_session(max_length=max_length) as session:
        model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            session=session,
            streamer=recorder,
        )


def run_recovery(make_client, ids, n: int, injector: FailureInjector) -> dict:
    model = make_client(ban_timeout_s=0.5)
    p, rng = injector.p, injector.rng
    injector.p = 0.0  # warm-up of the fresh client (connections, first session), not timed
    _generate(model, ids, 4, TokenRecorder(), ids.shape[1] + 4)
    injector.p = p
    injector.rng, injector.calls = rng, 0
    recorder = TokenRecorder()
    started = time.perf_counter()
    error = None
    try:
        _generate(model, ids, n, recorder, ids.shape[1] + n)
    except CorollaError as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    elapsed = time.perf_counter() - started
    model.shutdown()
    return dict(time_s=elapsed, tokens=recorder.tokens, error=error, restarts=0, wasted_s=0.0, capped=False)


def run_restart(model, ids, n: int, injector: FailureInjector, cap_s: float) -> dict:
    started = time.perf_counter()
    restarts, wasted, capped = 0, 0.0, False
    while True:
        recorder = TokenRecorder()
        attempt = time.perf_counter()
        try:
            _generate(model, ids, n, recorder, ids.shape[1] + n)
            break
        except CorollaError:
            restarts += 1
            wasted += time.perf_counter() - attempt
            if time.perf_counter() - started > cap_s:
                capped = True
                break
    elapsed = time.perf_counter() - started
    return dict(time_s=elapsed, tokens=recorder.tokens, error=None, restarts=restarts, wasted_s=wasted, capped=capped)


def run_recompute(model, ids, n: int, injector: FailureInjector) -> dict:
    started = time.perf_counter()
    generated: list[int] = []
    restarts, recomputed = 0, 0
    while len(generated) < n:
        recorder = TokenRecorder()
        prefix = torch.cat([ids, torch.tensor([generated], dtype=ids.dtype)], dim=1) if generated else ids
        try:
            _generate(model, prefix, n - len(generated), recorder, ids.shape[1] + n)
        except CorollaError:
            restarts += 1
        generated += recorder.tokens
        if len(generated) < n:
            recomputed += ids.shape[1] + len(generated)  # what the next session re-feeds
    elapsed = time.perf_counter() - started
    return dict(
        time_s=elapsed, tokens=generated, error=None, restarts=restarts, wasted_s=0.0, capped=False,
        recomputed_tokens=recomputed,
    )  # fmt: skip


def expected_restart_time(t_token: float, p: float, servers: int, n: int) -> float:
    """Expected time to get n consecutive successful steps when any failure restarts from zero."""
    s = (1.0 - p) ** servers
    if s >= 1.0:
        return t_token * n
    try:
        return t_token * (s ** (-n) - 1.0) / (1.0 - s)
    except OverflowError:
        return float("inf")


def run_model(name: str, n: int, preset: dict, log_dir: Path | None) -> list[dict]:
    from tests.fixtures.zoo import zoo_checkpoint

    spans, prompt_len = MODELS[name]
    if name.startswith("tiny"):
        path = str(zoo_checkpoint("llama"))
    else:
        from corolla.models.bundled import ensure_bundled_checkpoint

        path = str(ensure_bundled_checkpoint(name))
    chain = len(spans)
    gen = torch.Generator().manual_seed(preset["seed"])
    ids = torch.randint(4, 400, (1, prompt_len), generator=gen)
    rows = []
    injector = FailureInjector()
    print(f"\n== {name}: {chain} spans x 2 servers, prompt {prompt_len}, {n} new tokens", flush=True)
    t0 = time.perf_counter()
    swarm = LocalSwarm(model=path, spans=spans * 2, server_args=["--throughput", "100"], log_dir=log_dir)
    with swarm:
        print(f"   swarm up in {time.perf_counter() - t0:.1f} s", flush=True)

        def make_client(**overrides):
            peers = swarm.initial_peers
            return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, **overrides)

        plain = make_client(max_retries=0)
        injector.install()
        try:
            # warm-up (first sessions pay for connections and lazy imports)
            injector.reset(0.0, 0)
            _generate(plain, ids, 4, TokenRecorder(), ids.shape[1] + 4)
            reference = None
            t_token = {}
            for i, p in enumerate(preset["probs"]):
                seed = preset["seed"] * 1000 + i
                for strategy in STRATEGIES:
                    injector.reset(p, seed)
                    if strategy.startswith("recovery"):
                        result = run_recovery(make_client, ids, n, injector)
                    elif strategy == "restart":
                        result = run_restart(plain, ids, n, injector, preset["restart_cap_s"])
                    else:
                        result = run_recompute(plain, ids, n, injector)
                    result.update(model=name, strategy=strategy, p=p, n=n, chain=chain, failures=injector.failures)
                    result["calls"] = injector.calls
                    done = len(result["tokens"]) == n and not result["error"] and not result["capped"]
                    if p == 0 and done:
                        t_token[strategy] = result["time_s"] / n
                        reference = reference or result["tokens"]
                    result["expected_s"] = None
                    if strategy == "restart" and strategy in t_token:
                        result["expected_s"] = expected_restart_time(t_token[strategy], p, chain, n)
                    if done:
                        result["tokens_per_s"] = n / result["time_s"]
                    elif result["capped"] and result["expected_s"]:
                        result["tokens_per_s"] = n / result["expected_s"]
                    else:
                        result["tokens_per_s"] = None
                    result["same_tokens"] = (
                        None if reference is None or not done else result["tokens"] == reference
                    )  # fmt: skip
                    rows.append(result)
                    print("  ", _summary(result), flush=True)
        finally:
            injector.uninstall()
            plain.shutdown()
    for row in rows:
        base = next(
            (r for r in rows if r["model"] == row["model"] and r["strategy"] == row["strategy"] and r["p"] == 0), None
        )
        ok = base and base["tokens_per_s"] and row["tokens_per_s"]
        row["vs_p0"] = row["tokens_per_s"] / base["tokens_per_s"] if ok else None
        del row["tokens"]
    return rows


def _fmt_rate(row: dict) -> str:
    if row["tokens_per_s"] is None:
        return f"crashed ({row['error']})" if row["error"] else "n/a"
    text = f"{row['tokens_per_s']:.3g}"
    return f"{text} (capped; analytic)" if row["capped"] else text


def _summary(row: dict) -> str:
    return (
        f"p={row['p']:<6g} {row['strategy']:<9} {_fmt_rate(row)} tok/s, time {row['time_s']:.1f} s, "
        f"failures {row['failures']}, restarts {row['restarts']}, same tokens as p=0: {row['same_tokens']}"
    )


def write_outputs(rows: list[dict], run: Run, args, params: dict) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    started, command = run.started.date().isoformat(), run.command
    lines = [
        f"# Fault tolerance: tokens/s under random server failures (preset {args.preset})",
        "",
        f"- date: {started}; machine: {machine_line(args.machine)}",
        f"- command: `{command}`",
        "- batch 1, greedy; each server of the chain fails with probability p per step (client-side injection: "
        "the stream is closed, the server drops the session's cache); two servers per span on loopback",
        f"- restart is capped at {PRESETS[args.preset]['restart_cap_s']:.0f} s of wall time; a capped row gives "
        "n / (analytic expected time) with t_token measured at p=0",
        "",
        "| model | chain | N | p | strategy | tokens/s | vs p=0 | time s | failures | restarts/recomputes "
        "| wasted s | restart expected s (analytic) | same tokens as p=0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = f"{r['vs_p0']:.2f}" if r["vs_p0"] is not None else "-"
        expected = f"{r['expected_s']:.3g}" if r["expected_s"] is not None else "-"
        wasted = f"{r['wasted_s']:.1f}" if r["strategy"] == "restart" else "-"
        lines.append(
            f"| {r['model']} | {r['chain']} | {r['n']} | {r['p']:g} | {LABELS[r['strategy']]} | {_fmt_rate(r)} | "
            f"{vs} | {r['time_s']:.1f} | {r['failures']} | {r['restarts']} | {wasted} | {expected} | "
            f"{'-' if r['same_tokens'] is None else r['same_tokens']} |"
        )
    md, png = run.path(".md"), run.path(".png")
    md.write_text("\n".join(lines) + "\n")
    run.save(params=params, results={"rows": rows})

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        probs = sorted({r["p"] for r in rows if r["model"] == model})
        width = 0.8 / len(STRATEGIES)
        for k, strategy in enumerate(STRATEGIES):
            for j, p in enumerate(probs):
                match = [r for r in rows if r["model"] == model and r["strategy"] == strategy and r["p"] == p]
                row = match[0] if match else None
                if row is None:
                    continue
                value = row["tokens_per_s"] or 0.0
                x = j + (k - (len(STRATEGIES) - 1) / 2) * width
                hatch = "//" if row["capped"] else None
                ax.bar(x, value, width, color=f"C{k}", hatch=hatch, label=LABELS[strategy] if j == 0 else None)
                if row["tokens_per_s"] is None:
                    ax.text(x, 0, "crash", rotation=90, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(probs)), [f"p={p:g}" for p in probs])
        ax.set_ylabel("tokens/s (hatched: restart, analytic after cap)")
        n = next(r["n"] for r in rows if r["model"] == model)
        ax.set_title(f"{model}, {n} tokens, batch 1")
        ax.legend(fontsize=8)
    fig.suptitle(f"Fault tolerance, {started}, {args.machine}", fontsize=9)
    save_figure(fig, png)
    return md, png


def main() -> int:
    parser = experiment_parser(__doc__, PRESETS, log_dir="keep the servers' logs here")
    parser.add_argument("--models", nargs="*", help="subset of the preset's models")
    parser.add_argument("--verbose", action="store_true", help="show the client's recovery warnings")
    args = parser.parse_args()
    if not args.verbose:
        logging.getLogger("corolla").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    preset = PRESETS[args.preset]
    run = Run("fault_tolerance", args)
    rows = []
    for name, n in preset["models"].items():
        if args.models and name not in args.models:
            continue
        rows += run_model(name, n, preset, args.log_dir)
    params = dict(preset, models={m: n for m, n in preset["models"].items() if not args.models or m in args.models})
    md, png = write_outputs(rows, run, args, params)
    print("\n" + md.read_text())
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
