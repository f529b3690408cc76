"""A network lab: N hosts as Linux network namespaces on one bridge, each host's link shaped like the Internet.

Topology (nothing is routed outside the lab: no uplink, no default route)::

    <name>-sw  (namespace)   bridge br0 --- p1 --- p2 --- ... pN
                                            |      |          |   veth pairs
    <name>-<host> (one namespace per host)  eth0   eth0       eth0   10.77.0.1/24, 10.77.0.2/24, ...

A host listed in ``nat_hosts`` sits behind a home router instead, like most volunteers' machines: the router
(``<name>-<host>gw``) holds the host's public address on the bridge and masquerades the host's private network
(192.168.<i>.0/24, the host at .2) with no inbound port: the host can connect out, nobody can connect in.

Every lab lives in its own namespaces (names start with the lab's unique name), so several labs, and everything
else on the machine, don't collide; the addresses repeat from lab to lab but never meet.

Shaping (see :mod:`shaping` for the model): bandwidth with HTB on both ends of each host's veth (host egress = its
uplink, switch port egress = its downlink). Delay, jitter and loss with ``netem`` where the kernel has it;
otherwise with a user-space delayer (``delayer.c``, built with gcc against libnetfilter_queue at lab start): an
iptables rule in each host's namespace sends every incoming packet to NFQUEUE and the delayer holds it for
``delay(src) + delay(dst)`` before accepting it. Delaying on ingress (not egress) keeps TCP at line rate.

The lab checks its own shaping (:meth:`Lab.verify`: TCP round trips and a bulk transfer between every pair of hosts,
measured by ``probe.py`` inside the hosts) and raises :class:`LabError` when it is off; benchmarks call it before
measuring.

Run as root. CLI: ``python -m benchmarks.netlab --help``.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:  # run as a package (python -m benchmarks.netlab) or imported by path
    from . import shaping
    from .shaping import LinkShape
except ImportError:  # pragma: no cover
    import shaping  # type: ignore[no-redef]
    from shaping import LinkShape  # type: ignore[no-redef]

logger = logging.getLogger("corolla.netlab")

HERE = Path(__file__).resolve().parent
STATE_ROOT = Path(os.environ.get("COROLLA_NETLAB_STATE", "/run/corolla-netlab"))
SUBNET = "10.77.0"
PROBE_PORT = 7777
QUEUE_NUM = 0
APT_PACKAGES = ("iptables", "libnetfilter-queue-dev")
NFQ_HEADER = Path("/usr/include/libnetfilter_queue/libnetfilter_queue.h")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_HOST_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """The lab cannot start, or its measured shaping is off."""


class LabUnavailable(LabError):
    """This machine cannot run a lab (not root, no namespaces, missing tools)."""


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise LabError(f"`{shlex.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable_reason(mode: str = "auto") -> str | None:
    """Why a lab cannot run here (None if it can). ``mode``: auto, netem or nfqueue."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, tc, iptables)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"clprobe{os.getpid() % 100000}"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"cannot create network namespaces: {made.stderr.strip()}"
    try:
        has_netem = _netem_available(probe)
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    if mode == "netem" and not has_netem:
        return "the kernel has no netem qdisc"
    if mode == "nfqueue" or (mode == "auto" and not has_netem):
        missing = [t for t in ("iptables", "gcc") if shutil.which(t) is None]
        if not NFQ_HEADER.exists():
            missing.append(str(NFQ_HEADER))
        if missing:
            return (
                f"no netem and the user-space delayer needs {', '.join(missing)} "
                f"(apt-get install -y {' '.join(APT_PACKAGES)} gcc)"
            )
    return None


def _netem_available(namespace: str) -> bool:
    _run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=False)
    added = _run(
        ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
        check=False,
    )
    return added.returncode == 0


def _build_delayer() -> Path:
    """Compile delayer.c once per source version (cached under STATE_ROOT/bin)."""
    source = HERE / "delayer.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = STATE_ROOT / "bin" / f"delayer-{digest}"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f".{binary.name}.{os.getpid()}")
    _run(["gcc", "-O2", "-o", str(tmp), str(source), "-lnetfilter_queue", "-lnfnetlink"], timeout=120)
    os.replace(tmp, binary)
    return binary


def _kill_pid(pid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = Path(f"/proc/{pid}/stat")
    try:  # a zombie is dead for our purposes
        return state.read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Lab:
    """A lab of ``hosts`` (short names: letters and digits). Use as a context manager, or ``up()`` / ``down()``."""

    hosts: Sequence[str]
    name: str = field(default_factory=lambda: "cl" + secrets.token_hex(3))
    shapes: dict[str, LinkShape] = field(default_factory=dict)
    mode: str = "auto"  # auto (netem if the kernel has it, else nfqueue), netem, nfqueue
    nat_hosts: Sequence[str] = ()  # hosts behind a masquerading router (reachable by nobody)
    # each bandwidth check is a transfer of at least this long (at least 30 RTTs), timed over its second half
    bandwidth_s: float = 2.0
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)
    _pids: dict[str, int] = field(default_factory=dict, repr=False)
    _home_netns: int | None = field(default=None, repr=False)

    def __post_init__(self):
        self.hosts = list(self.hosts)
        if not _NAME_RE.match(self.name):
            raise ValueError(f"lab name {self.name!r}: 1-12 lowercase letters/digits, starting with a letter")
        if len(set(self.hosts)) != len(self.hosts) or not self.hosts:
            raise ValueError(f"hosts must be distinct and non-empty, got {self.hosts}")
        if len(self.hosts) > 250:
            raise ValueError("at most 250 hosts")
        for host in self.hosts:
            if not _HOST_RE.match(host) or host == "sw":
                raise ValueError(f"host name {host!r}: 1-12 lowercase letters/digits, starting with a letter, not sw")
        self.shapes = {host: self.shapes.get(host, LinkShape()) for host in self.hosts}
        self.nat_hosts = list(self.nat_hosts)
        if not set(self.nat_hosts) <= set(self.hosts):
            raise ValueError(f"nat_hosts {sorted(set(self.nat_hosts) - set(self.hosts))} are not hosts of the lab")

    # ------------------------------------------------------------------ names and addresses

    @property
    def switch_ns(self) -> str:
        return f"{self.name}-sw"

    def ns(self, host: str) -> str:
        """The network namespace of ``host``."""
        if host not in self.hosts:
            raise KeyError(f"no host {host!r} in lab {self.name} (hosts: {', '.join(self.hosts)})")
        return f"{self.name}-{host}"

    @property
    def addresses(self) -> dict[str, str]:
        return {host: f"{SUBNET}.{i + 1}" for i, host in enumerate(self.hosts)}

    def address(self, host: str) -> str:
        """The host's public address (for a host behind NAT: its router's, which others see it connect from)."""
        return self.addresses[host]

    def gateway_ns(self, host: str) -> str:
        """The namespace of the router in front of a host behind NAT."""
        return f"{self.ns(host)}gw"

    def private_address(self, host: str) -> str:
        """The address a host behind NAT has on its own network (listen there or on 0.0.0.0)."""
        if host not in self.nat_hosts:
            raise KeyError(f"{host} is not behind NAT")
        return f"192.168.{self.hosts.index(host) + 1}.2"

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    def prefix(self, host: str) -> list[str]:
        """Command prefix that runs a command inside ``host``."""
        return ["ip", "netns", "exec", self.ns(host)]

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, *, verify: bool = True) -> Lab:
        """Create namespaces, links and shaping, start the delayers and probes; then check the shaping."""
        reason = unavailable_reason(self.mode)
        if reason:
            raise LabUnavailable(reason)
        if self.state_dir.exists() or any(ns.startswith(f"{self.name}-") for ns in _list_netns()):
            raise LabError(f"a lab named {self.name} already exists; `python -m benchmarks.netlab down {self.name}`")
        self.mode = self._resolve_mode()
        self.state_dir.mkdir(parents=True)
        self._save_state()
        sw = self.switch_ns
        _run(["ip", "netns", "add", sw])
        _run(["ip", "-n", sw, "link", "set", "lo", "up"])
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        for i, host in enumerate(self.hosts):
            ns, port = self.ns(host), f"p{i + 1}"
            on_bridge = self.gateway_ns(host) if host in self.nat_hosts else ns
            _run(["ip", "netns", "add", on_bridge])
            _run(["ip", "link", "add", "eth0", "netns", on_bridge, "type", "veth", "peer", "name", port, "netns", sw])
            _run(["ip", "-n", sw, "link", "set", port, "master", "br0", "up"])
            _run(["ip", "-n", on_bridge, "link", "set", "lo", "up"])
            _run(["ip", "-n", on_bridge, "addr", "add", f"{self.address(host)}/24", "dev", "eth0"])
            _run(["ip", "-n", on_bridge, "link", "set", "eth0", "up"])
            if host in self.nat_hosts:
                self._add_home_network(host)
            for key, value in (
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv4.tcp_rmem", "4096 131072 33554432"),
                ("net.ipv4.tcp_wmem", "4096 16384 33554432"),
            ):
                _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"], check=False)
        if self.mode == "nfqueue":
            binary = _build_delayer()
            self._write_rules()
            for host in self.hosts:
                self._start_delayer(host, binary)
        for host in self.hosts:
            if host not in self.nat_hosts:  # nobody could connect to a probe behind NAT
                self._start_probe(host)
        self._apply_shapes()
        self._save_state()
        hosts = ", ".join(f"{h}={self.address(h)}" for h in self.hosts)
        logger.info("lab %s up (%s): %s", self.name, self.mode, hosts)
        if verify:
            self.verify()
        return self

    def _add_home_network(self, host: str) -> None:
        """The host's namespace behind its router: a private /24, default route via the router, which masquerades
        outgoing connections and drops every connection that starts outside."""
        ns, gw, i = self.ns(host), self.gateway_ns(host), self.hosts.index(host) + 1
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", "lan0", "netns", gw])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"192.168.{i}.2/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "route", "add", "default", "via", f"192.168.{i}.1"])
        _run(["ip", "-n", gw, "addr", "add", f"192.168.{i}.1/24", "dev", "lan0"])
        _run(["ip", "-n", gw, "link", "set", "lan0", "up"])
        router = ["ip", "netns", "exec", gw]
        _run([*router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        _run([*router, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"])
        _run([*router, "iptables", "-w", "-A", "FORWARD", "-i", "eth0", "-o", "lan0", "-m", "conntrack",
              "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"])  # fmt: skip
        _run([*router, "iptables", "-w", "-A", "FORWARD", "-i", "eth0", "-o", "lan0", "-j", "DROP"])

    def _resolve_mode(self) -> str:
        if self.mode in ("netem", "nfqueue"):
            return self.mode
        if self.mode != "auto":
            raise ValueError(f"mode must be auto, netem or nfqueue, got {self.mode!r}")
        probe = f"{self.name}-sw"
        _run(["ip", "netns", "add", probe])
        try:
            return "netem" if _netem_available(probe) else "nfqueue"
        finally:
            _run(["ip", "netns", "del", probe], check=False)

    def _spawn(self, key: str, host: str, argv: Sequence[str]) -> subprocess.Popen:
        log = open(self.state_dir / f"{key}.log", "wb")  # noqa: SIM115 - owned by the process
        process = subprocess.Popen(
            [*self.prefix(host), *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._procs[key], self._pids[key] = process, process.pid
        return process

    def _wait_log(self, key: str, text: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        path = self.state_dir / f"{key}.log"
        while time.monotonic() < deadline:
            if path.exists() and text in path.read_text(errors="replace"):
                return
            if self._procs[key].poll() is not None:
                break
            time.sleep(0.02)
        raise LabError(f"{key} did not start: {path.read_text(errors='replace')[-2000:] if path.exists() else ''}")

    def _start_delayer(self, host: str, binary: Path) -> None:
        key = f"delayer-{host}"
        rules = self.state_dir / f"rules-{host}.txt"
        self._spawn(key, host, [str(binary), str(QUEUE_NUM), str(rules), str(secrets.randbits(63))])
        self._wait_log(key, "ready")
        iptables = ["iptables", "-w", "-t", "mangle", "-A", "PREROUTING", "-i", "eth0"]
        _run([*self.prefix(host), *iptables, "-j", "NFQUEUE", "--queue-num", str(QUEUE_NUM)])

    def _start_probe(self, host: str) -> None:
        key = f"probe-{host}"
        argv = [sys.executable, str(HERE / "probe.py"), "serve", "--host", self.address(host)]
        self._spawn(key, host, [*argv, "--port", str(PROBE_PORT)])
        self._wait_log(key, "listening")

    def down(self) -> None:
        """Stop everything running in the lab's namespaces and delete them. Idempotent; safe on a half-built lab."""
        self.leave()
        teardown(self.name, self.hosts)
        for process in self._procs.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        self._pids.clear()

    # ------------------------------------------------------------------ shaping

    def shape(self, shapes: LinkShape | Mapping[str, LinkShape], *, verify: bool = True, **verify_kwargs) -> dict:
        """Change the links' shapes (one shape for all hosts, or per host) on a running lab; then check them."""
        if isinstance(shapes, LinkShape):
            shapes = {host: shapes for host in self.hosts}
        unknown = set(shapes) - set(self.hosts)
        if unknown:
            raise KeyError(f"no hosts {sorted(unknown)} in lab {self.name}")
        self.shapes = {**self.shapes, **shapes}
        if self.mode == "nfqueue":
            self._write_rules()
            for host in self.hosts:
                _kill_pid(self._pids[f"delayer-{host}"], signal.SIGHUP)
        self._apply_shapes()
        self._save_state()
        return self.verify(**verify_kwargs) if verify else {}

    def _write_rules(self) -> None:
        for host in self.hosts:
            text = shaping.delayer_rules(self.shapes, self.addresses, host)
            path = self.state_dir / f"rules-{host}.txt"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    def _apply_shapes(self) -> None:
        for i, host in enumerate(self.hosts):
            shape = self.shapes[host]
            for ns, dev in ((self.ns(host), "eth0"), (self.switch_ns, f"p{i + 1}")):
                self._tc(ns, dev, shape)

    def _tc(self, ns: str, dev: str, shape: LinkShape) -> None:
        tc = ["ip", "netns", "exec", ns, "tc"]
        _run([*tc, "qdisc", "del", "dev", dev, "root"], check=False)
        netem = []
        if self.mode == "netem" and shape.needs_delayer:
            netem = ["netem", "delay", f"{shape.delay_ms}ms"]
            if shape.jitter_ms:
                netem += [f"{shape.jitter_ms}ms"]
            if shape.loss:
                netem += ["loss", f"{shape.loss * 100}%"]
            netem += ["limit", "100000"]
        if shape.rate_mbit is None:
            if netem:
                _run([*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", *netem])
            return
        rate = f"{shape.rate_mbit * 1000:.0f}kbit"
        burst = str(max(16_000, int(shape.rate_mbit * 1e6 / 8 * 0.002)))  # >= 2 ms of traffic
        _run([*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"])
        _run([*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb"]
             + ["rate", rate, "ceil", rate, "burst", burst, "cburst", burst])  # fmt: skip
        buffer = str(max(200_000, int(shape.rate_mbit * 1e6 / 8 * 0.1)))  # 100 ms of queue, like a router
        leaf = netem or ["bfifo", "limit", buffer]
        _run([*tc, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *leaf])

    # ------------------------------------------------------------------ running things in hosts

    def run(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` inside ``host``."""
        return subprocess.run([*self.prefix(host), *argv], **kwargs)

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` inside ``host``."""
        return subprocess.Popen([*self.prefix(host), *argv], **kwargs)

    def enter(self, host: str) -> None:
        """Move the calling thread (call it from the main thread, before starting threads) into ``host``'s network
        namespace: sockets and child processes created afterwards live in the lab. ``down()`` moves it back."""
        if self._home_netns is None:
            self._home_netns = os.open("/proc/self/ns/net", os.O_RDONLY)
        enter_netns(f"/run/netns/{self.ns(host)}")

    def leave(self) -> None:
        """Move the calling thread back to the network namespace it had before ``enter``."""
        if self._home_netns is not None:
            enter_netns(self._home_netns)
            os.close(self._home_netns)
            self._home_netns = None

    # ------------------------------------------------------------------ self-check

    def _probe(self, client: str, servers: Sequence[str], kind: str, *extra: str, timeout: float = 60) -> dict:
        argv = [sys.executable, str(HERE / "probe.py"), kind, *(self.address(s) for s in servers)]
        result = self.run(
            client, [*argv, "--port", str(PROBE_PORT), *extra], capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise LabError(f"probe {kind} {client}->{','.join(servers)} failed: {result.stderr.strip()[-1000:]}")
        return json.loads(result.stdout)

    def verify(
        self,
        *,
        rtt: bool = True,
        bandwidth: bool = True,
        count: int = 7,
        rtt_tolerance_ms: float = 2.0,
        rtt_tolerance_rel: float = 0.1,
        bw_low: float = 0.6,
        bw_high: float = 1.15,
        attempts: int = 2,
    ) -> dict:
        """Measure the RTT of every pair of hosts (TCP echo, median of ``count``; each host probes the hosts after
        it) and the bandwidth of one transfer per pair (later host -> earlier host); raise :class:`LabError` if any
        is off (after ``attempts`` tries: a busy machine can delay one probe). Returns the measurements, keyed by
        pair (``"a<->b"``)."""
        report: dict = {"rtt_ms": {}, "bandwidth_mbit": {}}
        if len(self.hosts) < 2:
            return report
        errors: list[str] = []
        for attempt in range(attempts):
            errors = []
            if rtt:
                for ref, others in self._probe_plan():
                    errors += self._verify_rtt(ref, others, report, count, rtt_tolerance_ms, rtt_tolerance_rel)
            if bandwidth:
                for ref, others in self._probe_plan():
                    for src in others:
                        errors += self._verify_bandwidth(ref, src, report, bw_low, bw_high)
            if not errors:
                break
            if attempt + 1 < attempts:
                logger.warning("lab %s check failed (%s); measuring again", self.name, "; ".join(errors))
        if errors:
            raise LabError(f"lab {self.name} is off ({self.mode}): " + "; ".join(errors))
        logger.info("lab %s verified: %s", self.name, json.dumps(report))
        return report

    def _probe_plan(self) -> list[tuple[str, list[str]]]:
        """(client, the hosts it probes) covering every pair once, each host probing the hosts after it; a host
        behind NAT is always the client (nobody can connect to it) and two such hosts are not measured (they meet
        only through a relay)."""
        plan: dict[str, list[str]] = {host: [] for host in self.hosts}
        for i, a in enumerate(self.hosts):
            for b in self.hosts[i + 1 :]:
                if a in self.nat_hosts and b in self.nat_hosts:
                    continue
                client, server = (b, a) if b in self.nat_hosts else (a, b)
                plan[client].append(server)
        return [(client, servers) for client, servers in plan.items() if servers]

    @staticmethod
    def pair(a: str, b: str) -> str:
        """A pair's key in :meth:`verify`'s report."""
        return f"{a}<->{b}"

    def _verify_rtt(
        self, ref: str, others: Sequence[str], report: dict, count: int, tolerance_ms: float, tolerance_rel: float
    ) -> list[str]:
        slowest = max(shaping.expected_rtt_ms(self.shapes, ref, host) for host in others)
        timeout = 30 + count * len(others) * max(1.0, slowest)
        measured_all = self._probe(ref, others, "rtt", "--count", str(count), timeout=timeout)
        errors = []
        for host in others:
            measured = measured_all[self.address(host)]["median_ms"]
            expected = shaping.expected_rtt_ms(self.shapes, ref, host)
            jitter = self.shapes[ref].jitter_ms + self.shapes[host].jitter_ms
            tolerance = tolerance_ms + tolerance_rel * expected + jitter
            report["rtt_ms"][self.pair(ref, host)] = {
                "measured": measured,
                "expected": expected,
                "tolerance": tolerance,
            }
            if abs(measured - expected) > tolerance:
                errors.append(
                    f"RTT {ref}<->{host} measured {measured:.1f} ms, expected {expected:.1f} ± {tolerance:.1f} ms"
                )
        return errors

    def _verify_bandwidth(self, ref: str, src: str, report: dict, bw_low: float, bw_high: float) -> list[str]:
        cap = shaping.expected_rate_mbit(self.shapes, src, ref)
        if cap is None:
            return []
        rtt_s = shaping.expected_rtt_ms(self.shapes, ref, src) / 1e3
        seconds = max(self.bandwidth_s, 30 * rtt_s)
        measured = self._probe(ref, [src], "bw", "--seconds", f"{seconds:.2f}", timeout=seconds + 30)["mbit"]
        window_cap = 16e6 * 8 / max(rtt_s, 1e-3) / 1e6  # what a 16 MB TCP window sustains at this RTT
        low = bw_low * min(cap, window_cap)
        pair = self.pair(ref, src)
        report["bandwidth_mbit"][pair] = {"measured": measured, "expected": cap, "low": low, "high": bw_high * cap}
        if not low <= measured <= bw_high * cap:
            return [f"bandwidth {src}->{ref} measured {measured:.1f} Mbit/s, expected {low:.1f}..{bw_high * cap:.1f}"]
        return []

    # ------------------------------------------------------------------ state (for the CLI)

    def _save_state(self) -> None:
        state = {
            "name": self.name,
            "hosts": self.hosts,
            "mode": self.mode,
            "nat_hosts": self.nat_hosts,
            "addresses": self.addresses,
            "shapes": {h: str(s) for h, s in self.shapes.items()},
            "pids": self._pids,
        }
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, name: str) -> Lab:
        """The lab ``name`` started by another process (from its state file)."""
        path = STATE_ROOT / name / "state.json"
        if not path.exists():
            raise LabError(f"no lab named {name} (no {path})")
        state = json.loads(path.read_text())
        lab = cls(
            hosts=state["hosts"],
            name=state["name"],
            mode=state["mode"],
            nat_hosts=state.get("nat_hosts", []),
            shapes={h: LinkShape.parse(s) for h, s in state["shapes"].items()},
        )
        lab._pids = {k: int(v) for k, v in state["pids"].items()}
        return lab


def enter_netns(path: str | int) -> None:
    """setns(2) the calling thread into the network namespace at ``path`` (or an open file descriptor of one)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = path if isinstance(path, int) else os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        if not isinstance(path, int):
            os.close(fd)


def _list_netns() -> list[str]:
    result = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def teardown(name: str, hosts: Sequence[str] | None = None) -> list[str]:
    """Delete lab ``name``: kill every process inside its namespaces, delete the namespaces (which removes their
    veths, bridge, qdiscs and iptables rules) and its state folder. Idempotent. Returns the namespaces deleted."""
    if not _NAME_RE.match(name):
        raise ValueError(f"not a lab name: {name!r}")
    existing = _list_netns()
    if hosts is None:
        mine = [ns for ns in existing if ns.startswith(f"{name}-")]
    else:
        wanted = {f"{name}-{h}" for h in hosts} | {f"{name}-{h}gw" for h in hosts} | {f"{name}-sw"}
        mine = [ns for ns in existing if ns in wanted]
    pids: set[int] = set()
    for ns in mine:
        result = _run(["ip", "netns", "pids", ns], check=False)
        pids |= {int(p) for p in result.stdout.split() if p.isdigit()}
    pids.discard(os.getpid())  # a process that entered the lab (Lab.enter) does not kill itself
    for pid in pids:  # SIGTERM first: a delayer then lets its held packets go
        _kill_pid(pid)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            _kill_pid(pid, signal.SIGKILL)
    for ns in mine:
        _run(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(STATE_ROOT / name, ignore_errors=True)
    return mine


# ---------------------------------------------------------------------- CLI


def _parse_host_shapes(items: Sequence[str], hosts: Sequence[str], default: LinkShape) -> dict[str, LinkShape]:
    shapes = {host: default for host in hosts}
    for item in items:
        host, sep, text = item.partition(":")
        if not sep or host not in shapes:
            raise SystemExit(f"--host-shape wants HOST:SHAPE with HOST one of {', '.join(hosts)}, got {item!r}")
        shapes[host] = LinkShape.parse(text)
    return shapes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.netlab",
        description="Emulate the Internet between local processes: hosts are network namespaces on one bridge, "
        "each host's link has a delay, jitter, loss and rate. Needs root. A SHAPE is e.g. "
        "'delay=20ms,jitter=1ms,loss=0.1%,rate=100mbit' (one-way delay of the host's link: the RTT between two "
        "hosts is 2*(delay(A)+delay(B))).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="create a lab, shape it and check the shaping")
    p.add_argument("name", help="lab name (1-12 lowercase letters/digits); namespaces are NAME-HOST")
    p.add_argument("--hosts", nargs="+", default=["a", "b"])
    p.add_argument("--shape", default="none", help="SHAPE of every host's link")
    p.add_argument("--host-shape", nargs="*", default=[], metavar="HOST:SHAPE", help="per-host SHAPE")
    p.add_argument("--mode", choices=["auto", "netem", "nfqueue"], default="auto")
    p.add_argument("--no-verify", action="store_true")
    p = sub.add_parser("shape", help="change the shaping of a running lab")
    p.add_argument("name")
    p.add_argument("--shape", default="none")
    p.add_argument("--host-shape", nargs="*", default=[], metavar="HOST:SHAPE")
    p.add_argument("--no-verify", action="store_true")
    p = sub.add_parser("check", help="measure RTT and bandwidth; exit 1 if off")
    p.add_argument("name")
    p = sub.add_parser("exec", help="run a command inside a host: exec NAME HOST -- CMD ...")
    p.add_argument("name")
    p.add_argument("host")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = sub.add_parser("down", help="stop and delete a lab (idempotent)")
    p.add_argument("name")
    sub.add_parser("list", help="labs with state on this machine")
    sub.add_parser("available", help="say whether this machine can run a lab")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.cmd == "up":
            lab = Lab(hosts=args.hosts, name=args.name, mode=args.mode)
            lab.shapes = _parse_host_shapes(args.host_shape, lab.hosts, LinkShape.parse(args.shape))
            try:
                lab.up(verify=not args.no_verify)
            except BaseException:
                lab.down()
                raise
            print(json.dumps({"name": lab.name, "mode": lab.mode, "addresses": lab.addresses}, indent=1))
        elif args.cmd == "shape":
            lab = Lab.load(args.name)
            shapes = _parse_host_shapes(args.host_shape, lab.hosts, LinkShape.parse(args.shape))
            report = lab.shape(shapes, verify=not args.no_verify)
            print(json.dumps(report, indent=1))
        elif args.cmd == "check":
            print(json.dumps(Lab.load(args.name).verify(), indent=1))
        elif args.cmd == "exec":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                raise SystemExit("exec: give a command after --")
            return Lab.load(args.name).run(args.host, command).returncode
        elif args.cmd == "down":
            deleted = teardown(args.name)
            print(f"deleted {len(deleted)} namespaces" + (f": {' '.join(deleted)}" if deleted else ""))
        elif args.cmd == "list":
            for path in sorted(STATE_ROOT.glob("*/state.json")):
                state = json.loads(path.read_text())
                hosts = ", ".join(f"{h}={a}" for h, a in state["addresses"].items())
                print(f"{state['name']}: {state['mode']}, {hosts}")
        elif args.cmd == "available":
            reason = unavailable_reason()
            print(reason or "yes")
            return 1 if reason else 0
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
