"""``corolla demo`` itself, as a user runs it: the real model answers, and every process it started stops."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROMPT = "What is the capital of France?"
NEW_TOKENS = 8


def _descendants(process: psutil.Process) -> dict[int, float]:
    """pid -> create time of every live descendant of ``process`` (servers, DHT processes, p2pd daemons)."""
    found = {}
    try:
        children = process.children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            found[child.pid] = child.create_time()
        except psutil.Error:
            pass
    return found


def _still_running(pid: int, created: float) -> bool:
    """Whether the process ``pid`` that started at ``created`` is still alive (not a reused pid, not a zombie)."""
    try:
        process = psutil.Process(pid)
        return process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_demo_answers_and_stops_every_process(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    local = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    answer = tokenizer.decode(
        local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1] :], skip_special_tokens=True
    ).strip()
    assert answer  # the real model says something to this prompt

    command = [sys.executable, "-m", "corolla.cli.main", "demo", "--servers", "2"]
    command += ["--max-new-tokens", str(NEW_TOKENS), "--prompt", PROMPT]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started: dict[int, float] = {}  # every process the demo started, and theirs
    direct: set[int] = set()  # the ones the demo started itself
    streams: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda name=name, pipe=pipe: streams.__setitem__(name, pipe.read()), daemon=True)
        for name, pipe in (("stdout", demo.stdout), ("stderr", demo.stderr))
    ]
    for reader in readers:
        reader.start()
    try:
        parent = psutil.Process(demo.pid)
        deadline = time.monotonic() + 300
        while demo.poll() is None:  # note every process the demo starts (and theirs) while it runs
            started.update(_descendants(parent))
            try:
                direct.update(child.pid for child in parent.children())
            except psutil.Error:
                pass
            assert time.monotonic() < deadline, "the demo did not finish in time"
            time.sleep(0.1)
    finally:
        if demo.poll() is None:
            demo.kill()
        demo.wait(timeout=30)
        for reader in readers:
            reader.join(timeout=30)
    out, err = streams.get("stdout", ""), streams.get("stderr", "")
    assert demo.returncode == 0, err[-3000:]
    # at least the bootstrap peer and the 2 servers, and helpers of theirs (DHT processes, p2pd daemons)
    assert len(direct) >= 3 and len(started) > len(direct), (direct, started)
    left = [pid for pid, created in started.items() if _still_running(pid, created)]
    assert not left, f"the demo left processes running: {[psutil.Process(pid).cmdline() for pid in left]}"
    said = out.split("assistant> ", 1)[1].split("[demo] Route used:", 1)[0].strip()
    assert said == answer
    assert "[demo] Done: all processes stopped." in out
