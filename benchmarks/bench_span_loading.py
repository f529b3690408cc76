"""Loading a Llama-2-70B-shaped span from a cold disk, against the disk's own sequential read speed in the same run.

The script writes a checkpoint shaped like Llama-2-70B (``LlamaForCausalLM``, hidden 8192, intermediate 28672, 64
heads, 8 KV heads, 80 layers, bfloat16) holding the random weights of a few consecutive blocks only, as sharded
safetensors with ``model.safetensors.index.json``; shards are cut every 1.5 blocks, so the shards that hold the
span also hold blocks outside it. Then, in interleaved rounds (the order alternating), each after evicting the
checkpoint's files from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)`` on the fsynced files, checked with
``mincore``):

- **disk**: the span's byte ranges of the shards read with large sequential reads (64 MiB) into one reused buffer,
  once with ``O_DIRECT`` and once through the page cache; the faster of the two is the disk's speed;
- **load**: ``load_span`` of the span in a fresh Python process, timed from the call to the span model, with its
  peak resident memory (``VmHWM``, reset after the imports, minus the resident memory then), the bytes it
  caused to be read from disk (``/proc/self/io`` ``read_bytes``), and the time of its first forward step (one
  token, with a KV cache) right after loading.

Goals (issue 17): load speed ≥ 0.8 × disk speed, peak memory ≤ 1.2 × the span's bytes, and no block outside the
span read (bytes read from disk ≈ the span's bytes). The checkpoint is deleted at the end.

    python benchmarks/bench_span_loading.py --preset smoke   # tiny shapes, 1 round, seconds, to a temp folder
    python benchmarks/bench_span_loading.py --preset full    # 70B shapes, ~8.6 GB written -> docs/results/
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import queue
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args, save_figure  # noqa: E402

LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
PRESETS = {
    "smoke": dict(shape=dict(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=2),
                  first_block=38, written_blocks=5, span=(39, 42), rounds=1, measure_speed=False, settle_s=0.0),
    "full": dict(shape=LLAMA_70B, first_block=38, written_blocks=5, span=(39, 42), rounds=3, measure_speed=True,
                 settle_s=5.0),
}  # fmt: skip
GOALS = dict(load_over_disk=0.8, peak_rss_over_span=1.2)
CHUNK_BYTES = 64 << 20
BLOCK_TENSORS = (  # name inside the block, shape as a function of the config
    ("input_layernorm.weight", lambda c: (c["hidden_size"],)),
    ("self_attn.q_proj.weight", lambda c: (c["hidden_size"], c["hidden_size"])),
    ("self_attn.k_proj.weight", lambda c: (_kv_dim(c), c["hidden_size"])),
    ("self_attn.v_proj.weight", lambda c: (_kv_dim(c), c["hidden_size"])),
    ("self_attn.o_proj.weight", lambda c: (c["hidden_size"], c["hidden_size"])),
    ("post_attention_layernorm.weight", lambda c: (c["hidden_size"],)),
    ("mlp.gate_proj.weight", lambda c: (c["intermediate_size"], c["hidden_size"])),
    ("mlp.up_proj.weight", lambda c: (c["intermediate_size"], c["hidden_size"])),
    ("mlp.down_proj.weight", lambda c: (c["hidden_size"], c["intermediate_size"])),
)


def _kv_dim(config: dict) -> int:
    return config["hidden_size"] // config["num_attention_heads"] * config["num_key_value_heads"]


# ---- the checkpoint -------------------------------------------------------------------------------------------------


def model_config(shape: dict) -> dict:
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=80, vocab_size=32000,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
        tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, **shape,
    )  # fmt: skip


def write_checkpoint(folder: Path, config: dict, blocks: range) -> list[Path]:
    """Random bfloat16 weights of ``blocks`` as safetensors shards cut every 1.5 blocks, plus config and index."""
    numel = math.prod
    tensors = [(f"model.layers.{i}.{name}", shape(config)) for i in blocks for name, shape in BLOCK_TENSORS]
    block_bytes = sum(2 * numel(shape(config)) for _, shape in BLOCK_TENSORS)
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in tensors:
        if shards[-1] and size + 2 * numel(shape) > 1.5 * block_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += 2 * numel(shape)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    weight_map, paths = {}, []
    for n, shard in enumerate(shards, 1):
        path = folder / f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(path, shard, seed=n)
        weight_map.update({name: path.name for name, _ in shard})
        paths.append(path)
    total = sum(2 * numel(shape) for _, shape in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return paths


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple]], *, seed: int) -> None:
    """A safetensors file of random bfloat16 values in ±[2^-7, 2^-6) (no NaN, Inf or subnormal: those could
    change the speed of the first forward), generated in a thread while the previous chunk is written."""
    import numpy as np

    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    chunks: queue.Queue = queue.Queue(maxsize=2)

    def produce() -> None:
        rng = np.random.default_rng(seed)
        remaining = offset
        while remaining:
            n = min(CHUNK_BYTES, remaining) // 2
            values = rng.integers(0, 1 << 16, n, dtype=np.uint16)
            values &= 0x807F  # sign and mantissa random
            values |= 0x3C00  # exponent 120: 2^-7
            chunks.put(values)
            remaining -= 2 * n
        chunks.put(None)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        while (values := chunks.get()) is not None:
            f.write(values.data)
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be evicted
    producer.join()


# ---- measurements ---------------------------------------------------------------------------------------------------


def evict(paths: list[Path]) -> int | None:
    """Drop the files from the page cache; the bytes of them still cached afterwards (None if unknown)."""
    from corolla.models.tensor_reader import cached_bytes

    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    cached = [cached_bytes(path) for path in paths]
    return None if None in cached else sum(cached)


def span_ranges(folder: Path, span: tuple[int, int]) -> dict[Path, tuple[int, int, int]]:
    """For each shard holding span tensors: (first byte, last byte + 1) of them and the bytes of span tensors."""
    from corolla.models.checkpoint import parse_block_key
    from corolla.models.tensor_reader import read_header

    ranges = {}
    for path in sorted(folder.glob("*.safetensors")):
        entries = [e for k, e in read_header(path).items() if span[0] <= parse_block_key(k)[0] < span[1]]
        if entries:
            begin, end = min(e.begin for e in entries), max(e.end for e in entries)
            assert sum(e.num_bytes for e in entries) == end - begin, "the span's tensors are contiguous in a shard"
            ranges[path] = (begin, end, end - begin)
    return ranges


def read_disk(ranges: dict[Path, tuple[int, int, int]], *, direct: bool) -> float:
    """Seconds to read the ranges with 64 MiB sequential reads into one buffer (O_DIRECT or through the cache)."""
    buffer = mmap.mmap(-1, CHUNK_BYTES)  # page-aligned, as O_DIRECT needs
    view = memoryview(buffer)
    started = time.perf_counter()
    for path, (begin, end, _) in ranges.items():
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            offset = begin - begin % 4096 if direct else begin
            while offset < end:
                count = os.preadv(fd, [view[: min(CHUNK_BYTES, -(-(end - offset) // 4096) * 4096)]], offset)
                if count <= 0:
                    break
                offset += count
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - started
    view.release()
    buffer.close()
    return elapsed


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (``VmRSS:``, ``VmHWM:``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(folder: str, start: int, end: int, measure_speed: bool) -> dict:
    """In a fresh process: load the span, then one forward step; memory and disk reads counted from after the
    imports."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 (imported before the baseline, as a server has)
    from transformers import AutoConfig

    from corolla.models.checkpoint import resolve_checkpoint
    from corolla.models.span import SpanInputs, load_span

    checkpoint = resolve_checkpoint(folder)
    config = AutoConfig.from_pretrained(folder)
    # the peak is this process's VmHWM, reset here: ru_maxrss would start at the parent's peak (the memory map the
    # process had before exec)
    Path("/proc/self/clear_refs").write_text("5")
    rss_before, read_before = _status_bytes("VmRSS:"), _read_bytes()
    started = time.perf_counter()
    span = load_span(checkpoint, start, end, config=config, dtype=torch.bfloat16)
    load_s = time.perf_counter() - started
    peak = _status_bytes("VmHWM:")
    read = _read_bytes() - read_before
    span_bytes = sum(p.numel() * p.element_size() for p in span.blocks.parameters())
    assert {p.dtype for p in span.blocks.parameters()} == {torch.bfloat16}
    hidden = torch.randn(1, 1, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.inference_mode():
        started = time.perf_counter()
        out = span(SpanInputs(hidden_states=hidden), span.new_cache())
        first_step_s = time.perf_counter() - started
    assert torch.isfinite(out).all()
    result = dict(
        load_s=load_s, span_bytes=span_bytes, rss_after_imports=rss_before, peak_rss=peak,
        peak_growth=peak - rss_before, read_bytes=read, first_step_s=first_step_s,
    )  # fmt: skip
    if measure_speed:  # a first start (no speed cached for this shape): the provisional speed before ONLINE, the
        # full measurement after it, in the background
        from corolla.server.throughput import measure_speed as measure
        from corolla.server.throughput import provisional_speed

        started = time.perf_counter()
        provisional_speed(span)
        result["provisional_speed_s"] = time.perf_counter() - started
        started = time.perf_counter()
        measure(span)
        result["measure_speed_s"] = time.perf_counter() - started
    return result


def memory_worker(sizes: list[int]) -> dict:
    """In a fresh process: seconds to get fresh memory for tensors of ``sizes`` bytes, every page faulted in (what
    any loader pays on top of the disk; the loader does it the same way, in a helper thread)."""
    import torch  # noqa: F401 (imported before the clock starts, as in the loading process)

    from corolla.models.tensor_reader import _fresh_bytes

    started = time.perf_counter()
    buffers = [_fresh_bytes(size, fault_in=True) for size in sizes]
    seconds = time.perf_counter() - started
    return dict(memory_s=seconds, memory_bytes=sum(b.numel() for b in buffers))


def run_worker(function: str, *args) -> dict:
    """``function(*args)`` of this module in a fresh Python process (arguments and result as JSON)."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import benchmarks.bench_span_loading as b; "
        "print('RESULT', json.dumps(getattr(b, sys.argv[2])(*json.loads(sys.argv[3]))))"
    )
    root = str(Path(__file__).resolve().parents[1])
    argv = [sys.executable, "-c", code, root, function, json.dumps(args)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the {function} process failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def span_entries(folder: Path, span: tuple[int, int]) -> list:
    from corolla.models.checkpoint import parse_block_key
    from corolla.models.tensor_reader import read_header

    return [
        e
        for path in sorted(folder.glob("*.safetensors"))
        for k, e in read_header(path).items()
        if span[0] <= parse_block_key(k)[0] < span[1]
    ]


def measure_round(order, paths, ranges, folder, span, sizes, measure_speed: bool, settle_s: float) -> dict:
    """One round: the disk, fresh memory and the load, in ``order``, each after evicting the checkpoint and letting
    the machine settle for ``settle_s`` (on a VM, memory freed by the previous process may still be backed by the
    host for a few seconds, which would make the next process's fresh memory cheaper than a cold start's)."""
    span_bytes = sum(n for _, _, n in ranges.values())
    result: dict = {}
    for what in order:
        if what == "disk":
            for direct in (True, False):
                kind = "direct" if direct else "buffered"
                result[f"cached_before_disk_{kind}"] = evict(paths)
                time.sleep(settle_s)
                result[f"disk_{kind}_gbps"] = span_bytes / read_disk(ranges, direct=direct) / 1e9
        elif what == "memory":
            time.sleep(settle_s)
            memory = run_worker("memory_worker", sizes)
            result["memory_gbps"] = memory["memory_bytes"] / memory["memory_s"] / 1e9
        else:
            result["cached_before_load"] = evict(paths)
            time.sleep(settle_s)
            result.update(run_worker("worker", str(folder), span[0], span[1], measure_speed))
            result["load_gbps"] = span_bytes / result["load_s"] / 1e9
    result["disk_gbps"] = max(result["disk_direct_gbps"], result["disk_buffered_gbps"])
    result["bound_gbps"] = min(result["disk_gbps"], result["memory_gbps"])
    return result


# ---- report ---------------------------------------------------------------------------------------------------------


def summarize(rounds: list[dict], span_bytes: int, whole_shard_bytes: int) -> dict:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    ratios = [r["load_gbps"] / r["disk_gbps"] for r in rounds]
    bound = [r["load_gbps"] / r["bound_gbps"] for r in rounds]
    return dict(
        span_bytes=span_bytes, whole_shard_bytes=whole_shard_bytes,
        disk_gbps=median("disk_gbps"), disk_direct_gbps=median("disk_direct_gbps"),
        disk_buffered_gbps=median("disk_buffered_gbps"), load_gbps=median("load_gbps"),
        memory_gbps=median("memory_gbps"), bound_gbps=median("bound_gbps"),
        load_over_disk=statistics.median(ratios), load_over_disk_range=[min(ratios), max(ratios)],
        load_over_bound=statistics.median(bound), load_over_bound_range=[min(bound), max(bound)],
        peak_rss_over_span=max(r["peak_growth"] for r in rounds) / span_bytes,
        read_over_span=max(r["read_bytes"] for r in rounds) / span_bytes,
        whole_shards_over_span=whole_shard_bytes / span_bytes,
        first_step_s=median("first_step_s"), load_s=median("load_s"),
        measure_speed_s=next((r["measure_speed_s"] for r in rounds if "measure_speed_s" in r), None),
        provisional_speed_s=next((r["provisional_speed_s"] for r in rounds if "provisional_speed_s" in r), None),
        rounds=rounds,
    )  # fmt: skip


def table(r: dict, params: dict) -> str:
    n = len(r["rounds"])
    gib = r["span_bytes"] / 2**30
    lines = [
        f"| measurement ({n} rounds, cold page cache) | median | range | goal |",
        "|---|---|---|---|",
        f"| disk, sequential 64 MiB reads of the span's bytes (faster of O_DIRECT / page cache) | "
        f"{r['disk_gbps']:.2f} GB/s | {_span_of(r, 'disk_gbps')} GB/s | |",
        f"| fresh memory for the span's tensors, every page faulted in (a fresh process) | {r['memory_gbps']:.2f} "
        f"GB/s | {_span_of(r, 'memory_gbps')} GB/s | |",
        f"| `load_span` of blocks {params['span'][0]}:{params['span'][1]} ({gib:.2f} GiB, bfloat16) | "
        f"{r['load_gbps']:.2f} GB/s ({r['load_s']:.1f} s) | {_span_of(r, 'load_gbps')} GB/s | |",
        f"| load speed / disk speed | **{r['load_over_disk']:.2f}** | {r['load_over_disk_range'][0]:.2f}–"
        f"{r['load_over_disk_range'][1]:.2f} | ≥ {GOALS['load_over_disk']} |",
        f"| load speed / min(disk, fresh memory) | {r['load_over_bound']:.2f} | {r['load_over_bound_range'][0]:.2f}–"
        f"{r['load_over_bound_range'][1]:.2f} | |",
        f"| peak resident memory growth / span bytes (worst round) | **{r['peak_rss_over_span']:.3f}** | | "
        f"≤ {GOALS['peak_rss_over_span']} |",
        f"| bytes read from disk / span bytes (worst round) | **{r['read_over_span']:.3f}** | | 1.00 (whole shards: "
        f"{r['whole_shards_over_span']:.2f}) |",
        f"| first forward step (1 token) after loading | {r['first_step_s']:.2f} s | {_span_of(r, 'first_step_s')} s |"
        " |",
    ]
    if r.get("provisional_speed_s") is not None:
        lines.append(
            f"| first start of this shape: the provisional speed measured before ONLINE | "
            f"{r['provisional_speed_s']:.1f} s | | |"
        )
    if r.get("measure_speed_s") is not None:
        where = "after ONLINE, in the background" if r.get("provisional_speed_s") is not None else "before ONLINE"
        lines.append(
            f"| first start of this shape: the full speed measurement ({where}) | {r['measure_speed_s']:.1f} s | | |"
        )
    return "\n".join(lines) + "\n"


def _span_of(r: dict, key: str) -> str:
    values = [x[key] for x in r["rounds"]]
    return f"{min(values):.2f}–{max(values):.2f}"


def plot(r: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    rounds = range(1, len(r["rounds"]) + 1)
    lines = [("disk_direct_gbps", "disk, O_DIRECT", "s--"), ("disk_buffered_gbps", "disk, page cache", "^--"),
             ("memory_gbps", "fresh memory", "x:"), ("load_gbps", "load_span", "o-")]  # fmt: skip
    for key, label, style in lines:
        left.plot(list(rounds), [x[key] for x in r["rounds"]], style, label=label)
    left.set_xlabel("round")
    left.set_ylabel("GB/s")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    names = ["load / disk\n(goal ≥ 0.8)", "peak RSS / span\n(goal ≤ 1.2)", "read / span\n(goal 1.0)"]
    values = [r["load_over_disk"], r["peak_rss_over_span"], r["read_over_span"]]
    right.bar(names, values, color=["C0", "C1", "C2"])
    for x, goal in enumerate([GOALS["load_over_disk"], GOALS["peak_rss_over_span"], 1.0]):
        right.hlines(goal, x - 0.4, x + 0.4, colors="C3", linestyles="--")
    right.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (overrides the preset)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoint goes")
    add_output_args(parser)
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    preset["rounds"] = args.rounds or preset["rounds"]
    run = Run("span_loading", args)
    config = model_config(preset["shape"])
    blocks = range(preset["first_block"], preset["first_block"] + preset["written_blocks"])
    span = tuple(preset["span"])
    folder = Path(tempfile.mkdtemp(prefix="corolla-span-loading-", dir=args.dir)) / "checkpoint"
    try:
        started = time.perf_counter()
        paths = write_checkpoint(folder, config, blocks)
        written = sum(p.stat().st_size for p in paths)
        print(f"wrote {written / 1e9:.2f} GB in {len(paths)} shards in {time.perf_counter() - started:.0f} s")
        ranges = span_ranges(folder, span)
        span_bytes = sum(n for _, _, n in ranges.values())
        whole_shards = sum(p.stat().st_size for p in ranges)
        sizes = [e.num_bytes for e in span_entries(folder, span)]
        rounds = []
        for i in range(preset["rounds"]):
            measure_speed = preset["measure_speed"] and i == preset["rounds"] - 1
            order = ["disk", "memory", "load"] if i % 2 == 0 else ["load", "memory", "disk"]
            result = measure_round(order, paths, ranges, folder, span, sizes, measure_speed, preset["settle_s"])
            assert result["span_bytes"] == span_bytes, (result["span_bytes"], span_bytes)
            rounds.append(result)
            print(
                f"round {i + 1}: disk {result['disk_direct_gbps']:.2f} (O_DIRECT) / {result['disk_buffered_gbps']:.2f}"
                f" (page cache) GB/s, fresh memory {result['memory_gbps']:.2f} GB/s, load {result['load_gbps']:.2f} "
                f"GB/s, peak RSS growth {result['peak_growth'] / span_bytes:.3f}x span, read "
                f"{result['read_bytes'] / span_bytes:.3f}x span, first step {result['first_step_s']:.2f} s"
            )
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)

    results = summarize(rounds, span_bytes, whole_shards)
    params = dict(preset, model_config=config, written_blocks=list(blocks), written_bytes=written,
                  shards=len(paths), dir=str(args.dir))  # fmt: skip
    print(f"\n## Loading blocks {span[0]}:{span[1]} of a Llama-2-70B-shaped checkpoint, preset {args.preset}\n")
    print(table(results, params))
    run.save(params=params, results=results)
    plot(results, run.path(".png"), f"load_span of {span_bytes / 2**30:.2f} GiB from a cold page cache")


if __name__ == "__main__":
    main()
