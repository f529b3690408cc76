"""Swarm vs offloading (the "up to 10x faster than offloading" claim in miniature): batch-1 greedy per-token latency.

* ``local``: transformers' model, all weights in RAM (reference only).
* ``swarm``: three corolla servers on loopback, each holding a third of the blocks in RAM (0:10, 10:20, 20:30).
* ``offload``: transformers + accelerate big-model inference on one machine whose memory budget is smaller than the
  model: ``AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory={"cpu": BUDGET},
  offload_folder=...)``. accelerate then puts the embeddings and the first blocks in RAM and maps the rest to
  ``"disk"``; a disk block's weights are read from the checkpoint's safetensors files (accelerate's
  ``OffloadedWeightsLoader`` opens them per weight) before each forward and dropped after it, for every token.
  - ``offload (page cache)``: as is. The files stay in the OS page cache, so the "disk" reads are memory copies.
  - ``offload (cold)``: before every token the checkpoint's files are evicted from the page cache with
    ``posix_fadvise(POSIX_FADV_DONTNEED)``. The offloaded model reads a private copy of the checkpoint (fsynced
    once), because pages that another process maps (other runs using the shared checkpoint, our swarm's servers)
    cannot be evicted; ``/proc/sys/vm/drop_caches`` is not used (it would not evict those either, and it hits the
    whole shared machine). The time spent evicting is excluded from the token's latency.
* analytic bound for offloading: bytes of the offloaded weights per token / bandwidth, for the disk bandwidth
  measured here (cold reads of the copy) and for assumed bandwidths (NVMe SSD, PCIe 4.0 x16 host->GPU). It assumes
  transfers are perfectly overlapped with compute, so it is a lower bound on offloading's per-token time.

Everything runs on the same machine and cores; the swarm has no real network (loopback), so its latency is a
lower bound for a real swarm, and its per-token time includes three processes competing for the same cores.

    python benchmarks/exp_offloading.py --preset smoke --out /tmp/exp
    python benchmarks/exp_offloading.py --preset full             # -> docs/results/
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks.experiment` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from benchmarks.experiment import experiment_parser, machine_line, save_figure  # noqa: E402
from benchmarks.results import Run  # noqa: E402

PRESETS = {
    "smoke": dict(new_tokens=4, budget_mib=200, bandwidth_repeats=1),
    "full": dict(new_tokens=32, budget_mib=200, bandwidth_repeats=3),
}
ASSUMED_BANDWIDTHS = {"NVMe SSD, 3 GB/s": 3e9, "PCIe 4.0 x16 host->GPU, 25 GB/s": 25e9}
PROMPT = "Explain in one paragraph why the sky is blue."
SPANS = ["0:10", "10:20", "20:30"]


class TokenTimer:
    """A streamer recording when each token arrives; ``before_next`` runs after each token, outside the timing."""

    def __init__(self, before_next=None):
        self.before_next = before_next
        self.arrived: list[float] = []
        self.resumed: list[float] = []
        self.tokens: list[int] = []

    def put(self, value):
        self.arrived.append(time.perf_counter())
        if len(self.arrived) > 1:  # the first put() is the prompt
            self.tokens.extend(int(t) for t in value.reshape(-1))
        if self.before_next is not None:
            self.before_next()
        self.resumed.append(time.perf_counter())

    def end(self):
        pass

    def step_times(self) -> list[float]:
        """Seconds per decode step (the prefill, i.e. the first interval, is left out)."""
        intervals = [b - a for a, b in zip(self.resumed, self.arrived[1:])]
        return intervals[1:]

    def prefill_time(self) -> float:
        return self.arrived[1] - self.resumed[0]


def _generate(model, ids, new_tokens: int, timer: TokenTimer, **kwargs) -> None:
    with torch.no_grad():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, streamer=timer, **kwargs,
        )  # fmt: skip


def private_copy(source: Path) -> Path:
    """A copy of the checkpoint only this run maps (so its pages can be evicted), written back to disk."""
    dest = Path(tempfile.mkdtemp(prefix="corolla-exp-offload-")) / source.name
    shutil.copytree(source, dest)
    for f in dest.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be evicted
        finally:
            os.close(fd)
    return dest


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[Path]) -> int | None:
    """Bytes of ``files`` in the page cache (util-linux ``fincore``), None if it is not available."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)], text=True,
                         capture_output=True)  # fmt: skip
    if out.returncode != 0:
        return None
    return sum(int(line.split()[0]) for line in out.stdout.splitlines() if line.strip())


def cold_read_bandwidth(files: list[Path], repeats: int) -> float:
    """Bytes/s of reading ``files`` right after evicting them (median of ``repeats``)."""
    rates = []
    for _ in range(repeats):
        evict(files)
        total, started = 0, time.perf_counter()
        for f in files:
            with open(f, "rb") as handle:
                while chunk := handle.read(16 << 20):
                    total += len(chunk)
        rates.append(total / (time.perf_counter() - started))
    evict(files)
    return statistics.median(rates)


def offloaded_bytes(folder: Path, device_map: dict[str, str]) -> tuple[int, int]:
    """(bytes of the weights mapped to "disk", bytes of all weights) from the checkpoint's safetensors headers."""
    from safetensors import safe_open

    disk_prefixes = [name + "." for name, device in device_map.items() if device == "disk"]
    disk = total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                numel = 1
                for dim in piece.get_shape():
                    numel *= dim
                size = numel * {"F32": 4, "F16": 2, "BF16": 2}.get(piece.get_dtype(), 4)
                total += size
                if any(key.startswith(p) for p in disk_prefixes):
                    disk += size
    return disk, total


def measure_local(path: str, ids, n: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _generate(model, ids, 2, TokenTimer())  # warm-up
    timer = TokenTimer()
    _generate(model, ids, n, timer)
    del model
    return dict(timer=timer)


def measure_swarm(ids, n: int, log_dir: Path | None) -> dict:
    from corolla import AutoDistributedModelForCausalLM
    from corolla.local_swarm import LocalSwarm

    started = time.perf_counter()
    with LocalSwarm(model="smollm2-135m", spans=SPANS, server_args=["--throughput", "100"], log_dir=log_dir) as swarm:
        print(f"   swarm up in {time.perf_counter() - started:.1f} s", flush=True)
        model = AutoDistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=swarm.initial_peers)
        _generate(model, ids, 2, TokenTimer())  # warm-up: connections, first session
        timer = TokenTimer()
        _generate(model, ids, n, timer)
        model.shutdown()
    return dict(timer=timer)


def measure_offload(copy: Path, ids, n: int, budget_mib: int) -> tuple[dict, dict, dict]:
    from transformers import AutoModelForCausalLM

    files = sorted(copy.glob("*.safetensors"))
    offload_dir = Path(tempfile.mkdtemp(prefix="corolla-exp-offload-folder-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(copy), dtype=torch.float32, device_map="auto", max_memory={"cpu": f"{budget_mib}MiB"},
            offload_folder=str(offload_dir),
        ).eval()  # fmt: skip
        device_map = dict(model.hf_device_map)
        disk, total = offloaded_bytes(copy, device_map)
        info = dict(
            device_map=device_map, disk_bytes=disk, total_bytes=total,
            blocks_on_disk=sum(1 for k, v in device_map.items() if v == "disk" and ".layers." in k),
            blocks_in_ram=sum(1 for k, v in device_map.items() if v == "cpu" and ".layers." in k),
            offload_folder_files=len(list(offload_dir.rglob("*"))),
        )  # fmt: skip
        _generate(model, ids, 2, TokenTimer())  # warm-up
        warm = TokenTimer()
        _generate(model, ids, n, warm)
        resident = []

        def evict_and_check():
            evict(files)
            if len(resident) < 3:
                resident.append(resident_bytes(files))

        evict_and_check()
        cold = TokenTimer(before_next=evict_and_check)
        _generate(model, ids, n, cold)
        info["resident_after_evict"] = resident
        del model
    finally:
        shutil.rmtree(offload_dir, ignore_errors=True)
    return dict(timer=warm), dict(timer=cold), info


def write_outputs(rows: list[dict], bounds: list[dict], info: dict, run: Run, args, params: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    started, command = run.started.date().isoformat(), run.command
    swarm_ms = next(r["ms_per_token"] for r in rows if r["setup"] == "swarm")
    mib = 1 << 20
    resident = [None if r is None else round(r / mib, 1) for r in info["resident_after_evict"]]
    lines = [
        f"# Swarm vs offloading: per-token latency of batch-1 greedy generation (preset {args.preset})",
        "",
        f"- date: {started}; machine: {machine_line(args.machine)}",
        f"- command: `{command}`",
        f"- SmolLM2-135M float32, {info['n']} new tokens after a {info['prompt_tokens']}-token prompt, median decode "
        "step (prefill excluded)",
        f"- offload: memory budget {info['budget_mib']} MiB of a {info['total_bytes'] / mib:.0f} MiB model -> "
        f"{info['blocks_in_ram']} blocks (+ embeddings) in RAM, {info['blocks_on_disk']} blocks on disk, "
        f"{info['disk_bytes'] / mib:.0f} MiB read per token",
        f"- cold: checkpoint copy evicted with posix_fadvise(DONTNEED) before each token; bytes of it still in the "
        f"page cache after eviction (fincore, first tokens): {resident} MiB (what stays is mapped by the model's "
        "in-RAM part)",
        "- swarm: 3 servers x 10 blocks on loopback, same 2 cores, no network delay",
        "",
        "| setup | ms/token | offload time / swarm time | prefill s | same tokens as local |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['ms_per_token']:.1f} | {r['ms_per_token'] / swarm_ms:.2f} | "
            f"{r['prefill_s']:.2f} | {r['same_tokens']} |"
        )
    lines += [
        "",
        "Analytic lower bound for offloading (offloaded bytes per token / bandwidth, transfers fully overlapped):",
        "",
        "| bandwidth | GB/s | bound ms/token | bound / swarm measured |",
        "|---|---|---|---|",
    ]
    for b in bounds:
        lines.append(
            f"| {b['name']} | {b['bandwidth'] / 1e9:.2f} | {b['ms']:.1f} | {b['ms'] / swarm_ms:.2f} |"
        )  # fmt: skip
    md, png = run.path(".md"), run.path(".png")
    md.write_text("\n".join(lines) + "\n")
    run.save(params=params, results={"rows": rows, "bounds": bounds, "info": info})

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["setup"] for r in rows]
    values = [r["ms_per_token"] for r in rows]
    ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    for k, b in enumerate(bounds):
        ax.axhline(b["ms"], ls="--", lw=1, color=f"C{k + len(rows)}", label=f"offload bound: {b['name']}")
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylabel("ms per token (batch 1, decode)")
    ax.set_yscale("log")
    ax.set_title(f"SmolLM2-135M: swarm vs offloading, {started}\n{args.machine}", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, png)
    return md, png


def main() -> int:
    parser = experiment_parser(__doc__, PRESETS, log_dir="keep the servers' logs here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = PRESETS[args.preset]
    run = Run("offloading", args)
    n = preset["new_tokens"]

    from transformers import AutoTokenizer

    from corolla.models.bundled import ensure_bundled_checkpoint

    source = Path(ensure_bundled_checkpoint("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    copy = private_copy(source)
    try:
        print("== local (all weights in RAM)", flush=True)
        local = measure_local(str(source), ids, n)
        print("== swarm", flush=True)
        swarm = measure_swarm(ids, n, args.log_dir)
        print("== offload", flush=True)
        warm, cold, info = measure_offload(copy, ids, n, preset["budget_mib"])
        files = sorted(copy.glob("*.safetensors"))
        measured_bw = cold_read_bandwidth(files, preset["bandwidth_repeats"])
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)
    info.update(n=n, prompt_tokens=ids.shape[1], budget_mib=preset["budget_mib"])
    reference = local["timer"].tokens
    rows = []
    for setup, result in [
        ("local (all in RAM)", local),
        ("swarm", swarm),
        ("offload (page cache)", warm),
        ("offload (cold, evicted per token)", cold),
    ]:
        timer = result["timer"]
        rows.append(
            dict(
                setup=setup,
                ms_per_token=statistics.median(timer.step_times()) * 1e3,
                prefill_s=timer.prefill_time(),
                same_tokens=timer.tokens == reference,
            )  # fmt: skip
        )
    bounds = [dict(name="disk here, measured cold", bandwidth=measured_bw)]
    bounds += [dict(name=name, bandwidth=bw) for name, bw in ASSUMED_BANDWIDTHS.items()]
    for b in bounds:
        b["ms"] = info["disk_bytes"] / b["bandwidth"] * 1e3
    md, png = write_outputs(rows, bounds, info, run, args, dict(preset, spans=SPANS, prompt=PROMPT))
    print("\n" + md.read_text())
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
