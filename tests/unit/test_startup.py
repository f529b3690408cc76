"""The corolla command's import speed-ups: same modules and names as a normal import, a cache that notices change."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from corolla.startup import _cached_structure


def _run(code: str, tmp_path, **env) -> dict:
    environment = dict(os.environ, COROLLA_CACHE=str(tmp_path), **env)
    out = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=240, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_light_hivemind_skips_unused_packages_but_keeps_every_name(tmp_path):
    code = """
import json, sys
from corolla import startup
startup.install()
import hivemind.dht, hivemind.p2p
skipped = "hivemind.averaging" not in sys.modules and "scipy" not in sys.modules
import hivemind
from hivemind import DHT, DecentralizedAverager  # names of the real __init__ still work
print(json.dumps(dict(skipped=skipped, same=DHT is hivemind.dht.DHT, version=hivemind.__version__)))
"""
    result = _run(code, tmp_path)
    assert result == dict(skipped=True, same=True, version="1.1.12")


def test_cached_transformers_import_structure_equals_a_fresh_scan(tmp_path):
    code = """
import json
from corolla import startup
startup.install()
from transformers import AutoConfig, LlamaForCausalLM  # the lazy table resolves real classes
print(json.dumps(dict(llama=LlamaForCausalLM.__module__)))
"""
    first = _run(code, tmp_path)
    files = sorted((tmp_path / "transformers-import-structure").glob("*.pickle"))
    assert len(files) >= 2  # transformers, transformers.models (and each model package imported)
    second = _run(code, tmp_path)  # now read from the cache
    baseline = _run(code, tmp_path, COROLLA_FAST_IMPORTS="0")
    assert first == second == baseline == dict(llama="transformers.models.llama.modeling_llama")

    check = """
import json, pickle, sys
from pathlib import Path
from transformers.utils import import_utils
same = []
for f in Path(sys.argv[1]).glob("*.pickle"):
    key, stamp, cached = pickle.load(open(f, "rb"))
    _, path, prefix = key.split("|")
    same.append(cached == import_utils.define_import_structure(path, None if prefix == "None" else prefix))
print(json.dumps(dict(same=same)))
"""
    out = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "transformers-import-structure")],
        capture_output=True, text=True, timeout=240, check=True,
    )  # fmt: skip
    same = json.loads(out.stdout.strip().splitlines()[-1])["same"]
    assert same and all(same), same


def test_structure_cache_is_rescanned_when_the_folder_changes(tmp_path):
    models = tmp_path / "models"
    (models / "llama").mkdir(parents=True)
    scans = []

    def scan(path, prefix):
        scans.append(path)
        return {frozenset(): {f"{prefix}.{p.name}": {p.name} for p in sorted(models.iterdir())}}

    cache = tmp_path / "cache"
    first = _cached_structure(scan, str(models), "models", version="5.0", cache_root=cache)
    assert _cached_structure(scan, str(models), "models", version="5.0", cache_root=cache) == first
    assert len(scans) == 1  # the second call read the cache
    (models / "mistral").mkdir()  # a new model folder
    changed = _cached_structure(scan, str(models), "models", version="5.0", cache_root=cache)
    assert len(scans) == 2 and "models.mistral" in changed[frozenset()]
    _cached_structure(scan, str(models), "models", version="5.1", cache_root=cache)  # another transformers
    assert len(scans) == 3
