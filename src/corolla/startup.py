"""Faster process start for the ``corolla`` command (a server must be usable within seconds of its launch).

Two third-party import costs dominate a server's cold start and are pure waste for it:

- ``import hivemind`` runs ``hivemind/__init__.py``, which imports the averaging, MoE and optimizer packages (and
  scipy through them, ~0.35 s) that corolla never uses. :func:`light_hivemind` makes ``hivemind`` a plain package
  whose submodules (``hivemind.dht``, ``hivemind.p2p``, ...) load on their own; the names the real
  ``__init__`` exports are still there, imported the first time one of them is used.
- transformers builds its lazy-import table by reading and regex-parsing every file of its ~560 model folders, twice
  (``transformers`` and ``transformers.models``), ~0.8 s per process. :func:`cache_transformers_import_structure`
  keeps that table on disk, keyed by the transformers version and the model folders' modification times, so a
  changed installation is re-scanned.

Both are installed only by the ``corolla`` command, never by ``import corolla`` (a library must not change how its
user's own imports behave). ``COROLLA_FAST_IMPORTS=0`` turns them off. Any problem in them falls back to the normal,
slower import.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import pickle
import sys
import types
from pathlib import Path

logger = logging.getLogger(__name__)

_TRANSFORMERS_IMPORT_UTILS = "transformers.utils.import_utils"


def enabled() -> bool:
    return os.environ.get("COROLLA_FAST_IMPORTS", "1") != "0"


def install() -> None:
    """Both speed-ups, unless ``COROLLA_FAST_IMPORTS=0``; call before anything imports hivemind or transformers."""
    if not enabled():
        return
    light_hivemind()
    cache_transformers_import_structure()


# ---- hivemind ---------------------------------------------------------------------------------------------------
def light_hivemind() -> bool:
    """Register ``hivemind`` without running its ``__init__``; False if it is already imported or not installed."""
    if "hivemind" in sys.modules:
        return False
    spec = importlib.util.find_spec("hivemind")
    if spec is None or not spec.submodule_search_locations or spec.origin is None:
        return False
    package = types.ModuleType("hivemind")
    package.__file__, package.__spec__, package.__package__ = spec.origin, spec, "hivemind"
    package.__path__ = list(spec.submodule_search_locations)
    init_source = Path(spec.origin)
    root = init_source.parent

    def __getattr__(name: str):
        # a name the real __init__ defines (DHT, Optimizer, __version__, ...): run it once, then answer from it
        if name.startswith("__") and name != "__version__":
            raise AttributeError(name)
        submodule = sys.modules.get(f"hivemind.{name}")
        if submodule is not None:  # e.g. `import hivemind.p2p.x as y` while hivemind.p2p is still being imported
            return submodule
        if (root / name).is_dir() or (root / f"{name}.py").is_file():
            raise AttributeError(f"module 'hivemind' has no attribute {name!r} (submodule not imported yet)")
        if not package.__dict__.get("_corolla_init_done"):
            package._corolla_init_done = True
            exec(compile(init_source.read_text(), str(init_source), "exec"), package.__dict__)
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'hivemind' has no attribute {name!r}") from None

    package.__getattr__ = __getattr__
    sys.modules["hivemind"] = package
    return True


# ---- transformers -----------------------------------------------------------------------------------------------
def cache_transformers_import_structure(cache_root: Path | None = None) -> bool:
    """Keep transformers' lazy-import table on disk; False if transformers is already imported."""
    if _TRANSFORMERS_IMPORT_UTILS in sys.modules or "transformers" in sys.modules:
        return False
    if cache_root is None:
        from corolla.env import cache_dir

        cache_root = cache_dir()
    sys.meta_path.insert(0, _AfterImport(_TRANSFORMERS_IMPORT_UTILS, functools.partial(_patch, cache_root=cache_root)))
    return True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` right after module ``name`` is executed, before whoever imported it continues."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, then = spec.loader, self.then
        execute = loader.exec_module

        def exec_module(module):
            execute(module)
            try:
                then(module)
            except Exception as e:  # the speed-up is optional; the import itself must succeed
                logger.debug("Not caching transformers' import structure: %s", e)

        loader.exec_module = exec_module
        return spec


def _patch(import_utils, *, cache_root: Path) -> None:
    original = import_utils.define_import_structure
    version = _transformers_version(Path(import_utils.__file__).parents[1])

    @functools.lru_cache
    def define_import_structure(module_path, prefix=None):
        try:
            return _cached_structure(original, module_path, prefix, version=version, cache_root=cache_root)
        except Exception as e:
            logger.debug("Import-structure cache unusable (%s); scanning", e)
            return original(module_path, prefix)

    import_utils.define_import_structure = define_import_structure


def _transformers_version(package_dir: Path) -> str:
    for line in (package_dir / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise ValueError("transformers' __version__ not found")


def _cached_structure(original, module_path, prefix, *, version: str, cache_root: Path):
    folder = Path(module_path)
    if folder.is_file():
        folder = folder.parent
    # a new, removed or re-installed model folder changes these modification times
    stamp = [folder.stat().st_mtime_ns, *sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(folder))]
    key = f"{version}|{os.path.abspath(module_path)}|{prefix}"
    path = cache_root / "transformers-import-structure" / f"{_stable_hash(key)}-{version}.pickle"
    try:
        with open(path, "rb") as f:
            stored_key, stored_stamp, structure = pickle.load(f)
        if stored_key == key and stored_stamp == stamp:
            return structure
    except (OSError, EOFError, pickle.UnpicklingError, ValueError):
        pass
    structure = original(module_path, prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    with open(temporary, "wb") as f:
        pickle.dump((key, stamp, structure), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(temporary, path)  # atomic: concurrent servers never read a half-written table
    return structure


def _stable_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]
