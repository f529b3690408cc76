"""Start a private swarm on this machine: a bootstrap peer and servers, each its own process.

Used by ``corolla demo``, the integration tests and the benchmarks. It waits on readiness (the bootstrap peer's
printed address, then the servers' ONLINE records in the DHT), never on a fixed sleep, and stops only the
processes it started, by PID (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from corolla.log import get_logger

logger = get_logger(__name__)


def wait_for(predicate: Callable[[], bool], *, timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    """Poll ``predicate`` until it is true; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


@dataclass(kw_only=True)
class LocalSwarm:
    """A bootstrap peer plus servers of ``model``; use as a context manager."""

    model: str
    spans: Sequence[str] = ()  # e.g. ("0:10", "10:20", "20:30"); one server per span
    server_args: Sequence[str] = ()
    env: dict[str, str] | None = None
    log_dir: Path | None = None
    start_timeout_s: float = 120.0
    initial_peers: list[str] = field(default_factory=list)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # where each process runs: process name ("bootstrap", "server0", ...) -> a command prefix, e.g.
    # ["ip", "netns", "exec", "lab-h1"] to start it inside a network namespace (benchmarks/netlab)
    command_prefix: Callable[[str], Sequence[str]] | None = None
    # process name -> extra command-line arguments, e.g. ["--host-maddrs", "/ip4/10.77.0.2/tcp/0"]
    process_args: Callable[[str], Sequence[str]] | None = None
    peer_ids: dict[str, str] = field(default_factory=dict)  # server name -> base58 peer id
    launched_at: dict[str, float] = field(default_factory=dict)  # process name -> time.perf_counter() at its launch
    # fork the processes from a helper that has imported torch & co. once (corolla.warm_spawn); None: when the
    # environment says COROLLA_WARM_SPAWN=1 (the test suite). Never for a process with a command prefix (another
    # namespace) or an entry other than a Python script.
    warm_spawn: bool | None = None

    _identity_dir: Path | None = None
    _retired: list[subprocess.Popen] = field(default_factory=list)
    _pids: set[int] = field(default_factory=set)  # our processes and their helpers, seen alive (see _forget_shm)

    def __enter__(self) -> LocalSwarm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, name: str, args: list[str], entry: Sequence[str] = (), **kwargs) -> subprocess.Popen:
        stderr = subprocess.STDOUT
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stderr = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the process
        # each process leads its own process group, so its helpers (DHT process, p2pd) stop together with it
        prefix = list(self.command_prefix(name)) if self.command_prefix else []
        extra = list(self.process_args(name)) if self.process_args else []
        self.launched_at[name] = time.perf_counter()
        env = self._env()
        warm = self.warm_spawn if self.warm_spawn is not None else env.get("COROLLA_WARM_SPAWN") == "1"
        script = entry[0] if entry and entry[0].endswith(".py") else None  # entry: a script and its arguments
        if warm and not prefix and (not entry or script):
            from corolla.warm_spawn import shared_spawner

            argv = [*entry[1:], *args, *extra]
            process = shared_spawner(env).spawn(argv, env=env, script=script, stderr=stderr, **kwargs)
        else:
            process = subprocess.Popen(
                [*prefix, sys.executable, *(entry or ["-m", "corolla.cli.main"]), *args, *extra],
                env=env,
                stderr=stderr,
                start_new_session=True,
                **kwargs,
            )
        if stderr is not subprocess.STDOUT:
            stderr.close()  # the process has its own copy
        if name in self.processes:  # a restarted process: the old one (and its group) is still ours to clean up
            self._retired.append(self.processes[name])
        self.processes[name] = process
        return process

    def start(self) -> None:
        self.start_bootstrap()
        for i, span in enumerate(self.spans):
            self.start_server(f"server{i}", ["--blocks", span])
        if self.spans:
            self.wait_until_served()

    def start_bootstrap(self) -> None:
        """Start the bootstrap peer (``with LocalSwarm(...)`` does it already; this is for a swarm used without)."""
        if "bootstrap" in self.processes:
            raise RuntimeError(
                "this swarm already has a bootstrap peer (`with LocalSwarm(...)` starts one): start servers only"
            )
        self.initial_peers = self._start_dht_peer("bootstrap", [])

    def start_dht_peer(self, name: str) -> list[str]:
        """Another ``corolla dht`` peer joined through the bootstrap (e.g. one more relay for peers behind NAT);
        returns its multiaddrs (``initial_peers`` is left as it is)."""
        return self._start_dht_peer(name, ["--initial-peers", *self.initial_peers])

    def _start_dht_peer(self, name: str, args: list[str]) -> list[str]:
        process = self._spawn(name, ["dht", *args], stdout=subprocess.PIPE, text=True)
        line = self._read_until(process, "--initial-peers", f"the DHT peer {name}")
        return line.split("--initial-peers", 1)[1].split()

    def _read_until(self, process: subprocess.Popen, marker: str, what: str) -> str:
        """The first line of ``process``'s stdout containing ``marker`` (then its stdout is closed)."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with code {process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not print its address in time")
            line = process.stdout.readline()
            if marker in line:
                process.stdout.close()
                return line

    def start_server(self, name: str, extra_args: Sequence[str] = (), entry: Sequence[str] = ()) -> subprocess.Popen:
        """Start a server; it gets a persistent identity file, so its peer id is known (``peer_ids[name]``).

        ``entry`` replaces ``-m corolla.cli.main`` (the Python arguments before the CLI's), e.g. a test script
        that modifies the server before running the CLI.
        """
        identity = self._identity(name)
        args = ["serve", self.model, "--initial-peers", *self.initial_peers, "--identity", str(identity)]
        return self._spawn(name, [*args, *self.server_args, *extra_args], entry, stdout=subprocess.DEVNULL)

    def start_api(self, name: str = "api", extra_args: Sequence[str] = ()) -> str:
        """Start ``corolla api`` on a free loopback port; returns its base URL (``http://127.0.0.1:PORT/v1``) once
        it listens (it has connected to the swarm and loaded its models by then)."""
        args = ["api", "--initial-peers", *self.initial_peers, "--port", "0", *extra_args]
        line = self._read_until(self._spawn(name, args, stdout=subprocess.PIPE, text=True), "http://", "`corolla api`")
        return "http://" + line.split("http://", 1)[1].split()[0]

    def start_stage_peer(
        self, name: str, extra_args: Sequence[str] = (), entry: Sequence[str] = ()
    ) -> subprocess.Popen:
        """Start a SWARM stage peer of ``model`` (``corolla stage``); its peer id is ``peer_ids[name]``."""
        identity = self._identity(name)
        args = ["stage", self.model, "--initial-peers", *self.initial_peers, "--identity", str(identity)]
        return self._spawn(name, [*args, *extra_args], entry, stdout=subprocess.DEVNULL)

    def start_btard_peer(
        self, name: str, extra_args: Sequence[str] = (), entry: Sequence[str] = ()
    ) -> subprocess.Popen:
        """Start a BTARD peer (``corolla btard``, or the script ``entry`` given the same flags); its peer id is
        ``peer_ids[name]``."""
        identity = self._identity(name)
        args = [] if entry else ["btard"]
        args += ["--initial-peers", *self.initial_peers, "--identity", str(identity)]
        return self._spawn(name, [*args, *extra_args], entry, stdout=subprocess.DEVNULL)

    def _identity(self, name: str) -> Path:
        import tempfile

        from hivemind.p2p import PeerID

        from corolla.net.identity import load_or_create_identity

        if self._identity_dir is None:
            self._identity_dir = Path(tempfile.mkdtemp(prefix="corolla-swarm-ids-"))
        identity, _ = load_or_create_identity(self._identity_dir / f"{name}.key")
        self.peer_ids[name] = PeerID.from_identity(identity.read_bytes()).to_base58()
        return identity

    def stage_peers(self, experiment: str, num_stages: int, *, dht=None) -> dict[str, tuple[int, str]]:
        """Stage peer name -> (stage, state name) as their records say now (peers this swarm started only)."""
        records = self.stage_records(experiment, num_stages, dht=dht)
        return {name: (info.stage, info.state.name) for name, info in records.items()}

    def stage_records(self, experiment: str, num_stages: int, *, dht=None) -> dict:
        """Stage peer name -> its ``StagePeerInfo`` record as found now (peers this swarm started only). ``dht``:
        a client DHT peer to read them through (default: one started and shut down for this call, ~0.5 s of CPU
        for its DHT process and p2pd: pass one to callers that poll)."""
        from corolla.net.dht_process import client_dht
        from corolla.net.dht_records import fetch_stage_peers

        own = dht is None
        if own:
            dht = client_dht(self.initial_peers)
        try:
            found = fetch_stage_peers(dht, experiment=experiment, num_stages=num_stages)
        finally:
            if own:
                dht.shutdown()
        names = {peer: name for name, peer in self.peer_ids.items()}
        return {names[p.to_base58()]: info for stage in found for p, info in stage.items() if p.to_base58() in names}

    def wait_until_stages(
        self, experiment: str, num_stages: int, *, peers: Sequence[str], timeout_s: float | None = None
    ) -> dict[str, int]:
        """Wait until each named stage peer is ONLINE (and every stage has one); name -> its stage."""
        from corolla.net.dht_process import client_dht

        dht = client_dht(self.initial_peers)  # one for the whole wait, as in wait_until_served

        def ready() -> bool:
            self._check_alive()
            found = self.stage_peers(experiment, num_stages, dht=dht)
            online = {n: s for n, (s, state) in found.items() if state == "ONLINE"}
            return all(n in online for n in peers) and set(online.values()) >= set(range(num_stages))

        try:
            wait_for(ready, timeout_s=timeout_s or self.start_timeout_s, what="stage peers to be ONLINE", poll_s=0.5)
            found = self.stage_peers(experiment, num_stages, dht=dht)
        finally:
            dht.shutdown()
        return {n: s for n, (s, state) in found.items() if state == "ONLINE"}

    def served_spans(self) -> dict[str, tuple[int, int]]:
        """Server name -> the span it currently announces as ONLINE (servers this swarm started only)."""
        from corolla.net.dht_process import client_dht

        dht = client_dht(self.initial_peers)
        try:
            online = self._online_servers(dht, self._num_blocks())
        finally:
            dht.shutdown()
        names = {peer: name for name, peer in self.peer_ids.items()}
        return {
            names[p.to_base58()]: (i.start_block, i.end_block) for p, i in online.items() if p.to_base58() in names
        }

    def name_of(self, peer_id: str) -> str:
        """The name of the server process with ``peer_id``."""
        return next(name for name, known in self.peer_ids.items() if known == peer_id)

    def _num_blocks(self) -> int:
        from transformers import AutoConfig

        from corolla.models.checkpoint import resolve_checkpoint

        return AutoConfig.from_pretrained(resolve_checkpoint(self.model).folder).num_hidden_layers

    def _online_servers(self, dht, num_blocks: int) -> dict:
        """PeerID -> ServerInfo of every ONLINE server of this swarm's model, as ``dht`` sees it now."""
        from corolla.models.checkpoint import default_dht_prefix
        from corolla.net.dht_records import collect_servers, fetch_block_records

        records = fetch_block_records(dht, dht_prefix=default_dht_prefix(self.model), num_blocks=num_blocks)
        return collect_servers(records)

    def wait_until_served(
        self, num_blocks: int | None = None, *, min_servers: int | None = None, exclude: Sequence[str] = ()
    ) -> None:
        """Wait until every block has an ONLINE server (and at least ``min_servers`` servers are ONLINE).

        Servers whose peer ids are in ``exclude`` (e.g. killed ones whose records have not expired yet) don't count.
        """
        from corolla.net.dht_process import client_dht

        num_blocks = num_blocks or self._num_blocks()
        servers_wanted = len(self.spans) if min_servers is None else min_servers
        dht = client_dht(self.initial_peers)

        def served() -> bool:
            self._check_alive()
            online = [i for p, i in self._online_servers(dht, num_blocks).items() if p.to_base58() not in exclude]
            covered = all(any(i.start_block <= b < i.end_block for i in online) for b in range(num_blocks))
            return covered and len(online) >= servers_wanted

        try:
            wait_for(served, timeout_s=self.start_timeout_s, what="servers to cover all blocks", poll_s=0.25)
        finally:
            dht.shutdown()

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None and process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
                raise RuntimeError(f"{name} exited early with code {process.returncode}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process this swarm started (only the process itself, not its group)."""
        self._remember(self.processes[name].pid)
        self.processes[name].send_signal(sig)

    def _remember(self, pid: int) -> None:
        import psutil

        self._pids.add(pid)
        try:
            self._pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass

    def _forget_shm(self) -> None:
        """Remove the shared-memory files that our dead processes left in /dev/shm: torch names them after the
        creating pid, and a SIGKILLed peer (or its averager) never unlinks them: they would hold RAM until reboot."""
        import psutil

        for pid in self._pids:
            if psutil.pid_exists(pid):
                continue  # alive again under a new owner, or never died: not ours to touch
            for path in Path("/dev/shm").glob(f"torch_{pid}_*"):
                path.unlink(missing_ok=True)
        self._pids.clear()

    @staticmethod
    def process_groups(pid: int) -> set[int]:
        """The process groups of a process this swarm started and of all its helpers: each process leads its own
        group, and a DHT process leads another one, which its p2pd joins (see ``corolla.net.dht_process``)."""
        import psutil

        groups = {pid}
        try:
            for child in psutil.Process(pid).children(recursive=True):
                try:
                    groups.add(os.getpgid(child.pid))
                except ProcessLookupError:
                    pass
        except psutil.Error:
            pass
        return groups

    @staticmethod
    def _signal_groups(groups: set[int], sig: int) -> None:
        for group in groups:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _signal_group(self, process: subprocess.Popen, sig: int) -> None:
        self._signal_groups(self.process_groups(process.pid), sig)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every process this swarm started: SIGTERM, then SIGKILL if one outlives ``grace_s``."""
        for process in self._retired:
            self._remember(process.pid)
            self._signal_group(process, signal.SIGKILL)
        self._retired.clear()
        groups = {name: self.process_groups(process.pid) for name, process in self.processes.items()}
        for process in self.processes.values():
            self._remember(process.pid)
        for name, process in self.processes.items():
            self._signal_groups(groups[name], signal.SIGCONT)  # a frozen (SIGSTOPped) process cannot exit
            if process.poll() is None:
                process.terminate()  # the process itself shuts its helpers down gracefully
        deadline = time.monotonic() + grace_s
        for name, process in self.processes.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", name, grace_s)
                process.kill()
                process.wait(timeout=5)
            self._signal_groups(groups[name], signal.SIGKILL)  # helpers left behind by a killed process
        self.processes.clear()
        self._forget_shm()
        if self._identity_dir is not None:
            shutil.rmtree(self._identity_dir, ignore_errors=True)
