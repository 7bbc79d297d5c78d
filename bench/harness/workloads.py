"""The measurements. Each runs the same workload against every target, interleaved in rounds
so that a noisy neighbour on the shared machine hits all targets alike."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import procs
from .profile import PySpy, summarize
from .session import BenchError, KernelKind, Session, Target

STAGES = ("rtt", "output", "interrupt", "relay", "start", "idle")


@dataclass
class Params:
    rtt_warmup: int = 30
    rtt_runs: int = 300
    rounds: int = 3
    #: Round trips are cheap to interleave finely (the same runs, cut into more rounds), and
    #: the machine drifts: in one run raw's round medians went 3.76, 4.36, 4.93 ms in 3 rounds.
    rtt_rounds: int = 10
    #: The flushed-output cell is ipykernel-bound and noisy: one run of it ranged over
    #: 2,134-2,583 msg/s within 3 rounds, too wide for a 0.95x target; 7 rounds cost ~25 s more.
    output_rounds: int = 7
    lines: int = 5000
    flood_messages: int = 100_000
    single_starts: int = 3
    concurrent: int = 20
    interrupts: int = 10
    idle_seconds: float = 60.0

    @classmethod
    def quick(cls) -> Params:
        return cls(rtt_warmup=10, rtt_runs=60, rounds=1, rtt_rounds=2, output_rounds=1, lines=1000,
                   flood_messages=20_000, single_starts=1, concurrent=5, interrupts=3,
                   idle_seconds=5.0)  # fmt: skip


@dataclass
class Results:
    params: Params
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)

    def put(self, metric: str, target: str, value: Any) -> None:
        self.metrics.setdefault(metric, {})[target] = value

    def detail(self, stage: str, target: str, value: Any) -> None:
        self.details.setdefault(stage, {})[target] = value

    def error(self, target: str, stage: str, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        self.errors.setdefault(target, {})[stage] = text
        print(f"  ! {target} {stage}: {text}", flush=True)

    def as_dict(self) -> dict[str, Any]:
        return {"params": asdict(self.params), "metrics": self.metrics,
                "details": self.details, "errors": self.errors}  # fmt: skip


#: Pause before each flood, so that no target's flood runs in the wake of the previous one's
#: (in two runs the round of ours that came right after Jupyter Server's 20 s flood was the
#: slowest: 27,436 and 22,674 msg/s against 32,661-36,706 and 24,645-26,184).
SETTLE_S = 1.0


def in_turn(sessions: dict[str, Session], round_no: int) -> list[tuple[str, Session]]:
    """The sessions in order, reversed every other round, so that no target always runs
    right after the same other one."""
    order = list(sessions.items())
    return order if round_no % 2 == 0 else order[::-1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


class Bench:
    def __init__(
        self,
        targets: list[Target],
        params: Params,
        results: Results,
        py_spy: str | None = None,
        out_dir: Path | None = None,
    ) -> None:
        self.targets = targets
        self.p = params
        self.r = results
        self.py_spy = py_spy
        self.out_dir = out_dir or Path(".")

    async def guarded(self, target: Target, stage: str, fn: Callable[[], Awaitable[None]]) -> bool:
        try:
            await fn()
            return True
        except Exception as exc:
            self.r.error(target.name, stage, exc)
            return False

    async def open_all(self, kind: KernelKind, stage: str) -> dict[str, Session]:
        sessions: dict[str, Session] = {}
        for t in self.targets:

            async def open_one(t: Target = t) -> None:
                sessions[t.name] = await asyncio.wait_for(t.open_session(kind), 120)

            await self.guarded(t, stage, open_one)
        return sessions

    @staticmethod
    async def close_all(sessions: dict[str, Session]) -> None:
        await asyncio.gather(*(s.close() for s in sessions.values()), return_exceptions=True)

    # -- execute round trip, flushed output, interrupt (one ipykernel per target) ---------------
    async def kernel_stages(self, stages: set[str]) -> None:
        print("* ipykernel sessions", flush=True)
        sessions = await self.open_all("ipykernel", "ipykernel-session")
        try:
            if "rtt" in stages:
                await self.rtt(sessions)
                if self.py_spy:
                    await self.profile("rtt", sessions, self.rtt_profile_load)
            if "output" in stages:
                await self.output(sessions)
            if "interrupt" in stages:
                await self.interrupt(sessions)
        finally:
            await self.close_all(sessions)

    async def rtt(self, sessions: dict[str, Session]) -> None:
        print(f"* execute round trip: {self.p.rtt_runs} runs of 1+1", flush=True)
        await self.round_trips(sessions, "rtt")

    async def round_trips(self, sessions: dict[str, Session], stage: str) -> None:
        """`1+1` round trips, interleaved by target: metrics `{stage}_median_ms`,
        `{stage}_p99_ms` and `{stage}_server_cpu_us` (per round trip)."""
        times: dict[str, list[float]] = {name: [] for name in sessions}
        round_medians: dict[str, list[float]] = {name: [] for name in sessions}
        failed: set[str] = set()
        for name, s in sessions.items():
            try:
                for _ in range(self.p.rtt_warmup):
                    await s.execute("1+1", timeout=30)
            except BenchError as exc:
                failed.add(name)
                self.r.error(name, stage, exc)
        per_round = max(1, self.p.rtt_runs // self.p.rtt_rounds)
        targets = {t.name: t for t in self.targets}
        cpu: dict[str, list[float]] = {name: [] for name in sessions}
        for r in range(self.p.rtt_rounds):
            for name, s in in_turn(sessions, r):
                if name in failed:
                    continue
                pid = targets[name].server_pid()
                try:
                    cpu0 = procs.cpu_seconds(pid) if pid else 0.0
                    this_round = []
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        await s.execute("1+1", timeout=30)
                        this_round.append(time.perf_counter() - t0)
                    times[name] += this_round
                    round_medians[name].append(statistics.median(this_round) * 1e3)
                    if pid:
                        cpu[name].append((procs.cpu_seconds(pid) - cpu0) / per_round * 1e6)
                except BenchError as exc:
                    failed.add(name)
                    self.r.error(name, stage, exc)
        for name, ts in times.items():
            if ts and name not in failed:
                self.r.put(f"{stage}_median_ms", name, statistics.median(ts) * 1e3)
                self.r.put(f"{stage}_p99_ms", name, percentile(ts, 99) * 1e3)
                if cpu[name]:
                    self.r.put(f"{stage}_server_cpu_us", name, statistics.median(cpu[name]))
                self.r.detail(stage, name, {"runs": len(ts), "min_ms": min(ts) * 1e3,
                                            "mean_ms": statistics.fmean(ts) * 1e3,
                                            "round_medians_ms": round_medians[name],
                                            "server_cpu_us": cpu[name]})  # fmt: skip

    async def output(self, sessions: dict[str, Session]) -> None:
        n = self.p.lines
        print(f"* flushed output: {n} lines, print(i, flush=True)", flush=True)
        code = f"for i in range({n}):\n    print(i, flush=True)"
        expected = "".join(f"{i}\n" for i in range(n))
        rates: dict[str, list[float]] = {name: [] for name in sessions}
        ordered: dict[str, bool] = dict.fromkeys(sessions, True)
        msgs: dict[str, list[int]] = {name: [] for name in sessions}
        cpu: dict[str, list[float]] = {name: [] for name in sessions}
        kernel_cpu: dict[str, list[float]] = {name: [] for name in sessions}
        targets = {t.name: t for t in self.targets}
        for name, s in sessions.items():  # warm-up: the first big cell of a kernel is slower
            try:
                await s.execute("for i in range(500):\n    print(i, flush=True)", timeout=60)
            except BenchError as exc:
                self.r.error(name, "output", exc)
        for r in range(self.p.output_rounds):
            for name, s in in_turn(sessions, r):
                pid = targets[name].server_pid()
                kernel = procs.ipykernel_child(pid)
                try:
                    cpu0 = procs.cpu_seconds(pid) if pid else 0.0
                    k0 = procs.cpu_seconds(kernel) if kernel else 0.0
                    t0 = time.perf_counter()
                    c = await s.execute(code, timeout=max(60.0, n / 100))
                    dt = time.perf_counter() - t0
                    cpu1 = procs.cpu_seconds(pid) if pid else 0.0
                    k1 = procs.cpu_seconds(kernel) if kernel else 0.0
                except BenchError as exc:
                    self.r.error(name, "output", exc)
                    ordered[name] = False
                    continue
                rates[name].append(c.n_stream / dt)
                msgs[name].append(c.n_stream)
                if pid:
                    cpu[name].append((cpu1 - cpu0) / max(1, c.n_stream) * 1e6)
                if kernel:
                    kernel_cpu[name].append((k1 - k0) / max(1, c.n_stream) * 1e6)
                ordered[name] = ordered[name] and "".join(c.texts) == expected
        for name in sessions:
            if rates[name]:
                self.r.put("output_msgs_per_s", name, statistics.median(rates[name]))
                self.r.put("output_in_order", name, ordered[name])
                if cpu[name]:
                    self.r.put("output_cpu_us_per_msg", name, statistics.median(cpu[name]))
                if kernel_cpu[name]:
                    self.r.put("output_kernel_cpu_us_per_msg", name,
                               statistics.median(kernel_cpu[name]))
                self.r.detail("output", name, {"messages_per_run": msgs[name], "lines": n,
                                               "rates": rates[name],
                                               "server_cpu_us": cpu[name],
                                               "kernel_cpu_us": kernel_cpu[name]})  # fmt: skip

    async def interrupt(self, sessions: dict[str, Session]) -> None:
        print(f"* interrupt latency: {self.p.interrupts} sleeping cells", flush=True)
        for name, s in sessions.items():
            lat: list[float] = []
            replies: list[str] = []
            try:
                for _ in range(self.p.interrupts):
                    c = await s.request("execute_request", {"code": "import time; time.sleep(30)",
                                                            "silent": False})  # fmt: skip
                    try:
                        await asyncio.wait_for(asyncio.shield(c.busy), 10)
                        await asyncio.sleep(0.3)  # be inside time.sleep
                        t0 = time.perf_counter()
                        await s.interrupt()
                        await asyncio.wait_for(asyncio.shield(c.done), 10)
                        lat.append(time.perf_counter() - t0)
                    except TimeoutError:
                        raise BenchError("no busy/idle around the interrupted cell") from None
                    finally:
                        s.collectors.pop(c.msg_id, None)
                    await asyncio.sleep(0.05)
                    replies.append(str((c.reply or {}).get("ename", (c.reply or {}).get("status"))))
            except Exception as exc:
                self.r.error(name, "interrupt", exc)
                continue
            self.r.put("interrupt_ms", name, statistics.median(lat) * 1e3)
            self.r.detail("interrupt", name, {"latencies_ms": [x * 1e3 for x in lat],
                                              "replies": replies})  # fmt: skip

    # -- relay ceiling (flood kernel) --------------------------------------------------------
    async def relay(self) -> None:
        n = self.p.flood_messages
        print(f"* relay ceiling: flood kernel, {n} stream messages", flush=True)
        sessions = await self.open_all("flood", "relay")
        expected = "".join(f"line {i}\n" for i in range(n))
        try:
            rates: dict[str, list[float]] = {name: [] for name in sessions}
            cpu: dict[str, list[float]] = {name: [] for name in sessions}
            client_cpu: dict[str, list[float]] = {name: [] for name in sessions}
            delivered: dict[str, bool] = dict.fromkeys(sessions, True)
            counts: dict[str, list[int]] = {name: [] for name in sessions}
            targets = {t.name: t for t in self.targets}
            for name, s in list(sessions.items()):  # warm-up
                try:
                    await s.execute("flood 1000", timeout=60)
                except BenchError as exc:
                    self.r.error(name, "relay", exc)
                    await sessions.pop(name).close()
            # The flood kernel answers `1+1` at once (busy, reply, idle): what a round trip
            # costs beyond the kernel's own time.
            print(f"* round trip on the flood kernel: {self.p.rtt_runs} runs", flush=True)
            await self.round_trips(sessions, "floor_rtt")
            for r in range(self.p.rounds):
                for name, s in in_turn(sessions, r):
                    pid = targets[name].server_pid()
                    await asyncio.sleep(SETTLE_S)
                    try:
                        cpu0 = procs.cpu_seconds(pid) if pid else 0.0
                        own0 = time.process_time()
                        t0 = time.perf_counter()
                        c = await s.execute(f"flood {n}", timeout=max(120.0, n / 500))
                        dt = time.perf_counter() - t0
                        own1 = time.process_time()
                        cpu1 = procs.cpu_seconds(pid) if pid else 0.0
                    except BenchError as exc:
                        self.r.error(name, "relay", exc)
                        delivered[name] = False
                        continue
                    rates[name].append(c.n_stream / dt)
                    counts[name].append(c.n_stream)
                    client_cpu[name].append((own1 - own0) / max(1, c.n_stream) * 1e6)
                    if pid:
                        cpu[name].append((cpu1 - cpu0) / max(1, c.n_stream) * 1e6)
                    delivered[name] = delivered[name] and "".join(c.texts) == expected
            for name in sessions:
                if not rates[name]:
                    continue
                self.r.put("relay_msgs_per_s", name, statistics.median(rates[name]))
                self.r.put("relay_delivered", name, delivered[name])
                if cpu[name]:
                    self.r.put("relay_cpu_us_per_msg", name, statistics.median(cpu[name]))
                self.r.detail("relay", name, {"messages": n, "received": counts[name],
                                              "rates": rates[name], "server_cpu_us": cpu[name],
                                              "client_cpu_us": client_cpu[name]})  # fmt: skip
            if self.py_spy:
                await self.profile("relay", sessions, self.relay_profile_load)
        finally:
            await self.close_all(sessions)

    async def rtt_profile_load(self, s: Session) -> None:
        for _ in range(max(200, self.p.rtt_runs)):
            await s.execute("1+1", timeout=30)

    async def relay_profile_load(self, s: Session) -> None:
        await s.execute(f"flood {self.p.flood_messages}", timeout=300)

    async def profile(
        self,
        stage: str,
        sessions: dict[str, Session],
        load: Callable[[Session], Awaitable[None]],
    ) -> None:
        """Repeat a stage's load, unmeasured, with py-spy on each server (it costs CPU too)."""
        assert self.py_spy is not None
        targets = {t.name: t for t in self.targets}
        for name, s in sessions.items():
            pid = targets[name].server_pid()
            if not pid:
                continue
            raw = self.out_dir / f"{stage}-profile-{name}.collapsed"
            spy = PySpy(self.py_spy, pid, raw)
            try:
                await asyncio.sleep(0.5)
                await load(s)
            except BenchError as exc:
                self.r.error(name, f"{stage}-profile", exc)
            finally:
                await spy.stop()
            if raw.exists():
                lines = summarize(raw)
                (self.out_dir / f"{stage}-profile-{name}.txt").write_text("\n".join(lines) + "\n")
                self.r.details.setdefault("profile", {}).setdefault(stage, {})[name] = lines
                print(f"  py-spy, {name}, {stage}:", *lines[:12], sep="\n    ", flush=True)

    # -- kernel start, concurrent starts, idle cost -----------------------------------------
    async def starts(self, stages: set[str]) -> None:
        if "start" in stages:
            print(f"* kernel start: {self.p.single_starts} sequential", flush=True)
            times: dict[str, list[float]] = {t.name: [] for t in self.targets}
            for _ in range(self.p.single_starts):
                for t in self.targets:

                    async def one(t: Target = t) -> None:
                        t0 = time.perf_counter()
                        s = await asyncio.wait_for(t.open_session("ipykernel"), 120)
                        times[t.name].append(time.perf_counter() - t0)
                        await s.close()

                    await self.guarded(t, "start", one)
            for name, ts in times.items():
                if ts:
                    self.r.put("start_single_s", name, statistics.median(ts))
        for t in self.targets:
            await self.guarded(t, "concurrent", lambda t=t: self.concurrent(t, stages))

    async def concurrent(self, t: Target, stages: set[str]) -> None:
        n = self.p.concurrent
        pid = t.server_pid()
        print(f"* {t.name}: {n} kernels started at once", flush=True)
        rss0 = procs.rss_bytes(pid) if pid else None
        started: list[float] = []
        t0 = time.perf_counter()

        async def one() -> Session:
            s = await asyncio.wait_for(t.open_session("ipykernel"), 180)
            started.append(time.perf_counter() - t0)
            return s

        outcomes = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        total = time.perf_counter() - t0
        sessions = [o for o in outcomes if isinstance(o, Session)]
        failures = [f"{type(o).__name__}: {o}" for o in outcomes if not isinstance(o, Session)]
        try:
            rss1 = procs.rss_bytes(pid) if pid else None
            self.r.put("start_concurrent_total_s", t.name, total)
            self.r.put("start_concurrent_failures", t.name, len(failures))
            if pid:
                self.r.put("rss_before_mb", t.name, rss0 / 2**20 if rss0 else None)
                self.r.put("rss_after_mb", t.name, rss1 / 2**20 if rss1 else None)
            slowest = max(started, default=None)
            info = {"sessions": n, "failures": failures[:5], "slowest_s": slowest}
            self.r.detail("concurrent", t.name, info)
            if "idle" in stages and pid and sessions:
                print(f"* {t.name}: idle cost over {self.p.idle_seconds:.0f}s, "
                      f"{len(sessions)} sessions, clients connected", flush=True)  # fmt: skip
                await asyncio.sleep(3)  # let start-up work settle
                cpu0, w0 = procs.cpu_seconds(pid), time.perf_counter()
                await asyncio.sleep(self.p.idle_seconds)
                cpu1, w1 = procs.cpu_seconds(pid), time.perf_counter()
                self.r.put("idle_cpu_percent", t.name, (cpu1 - cpu0) / (w1 - w0) * 100)
                self.r.detail("idle", t.name, {"sessions": len(sessions), "window_s": w1 - w0,
                                               "cpu_s": cpu1 - cpu0})  # fmt: skip
        finally:
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    async def run(self, stages: set[str]) -> None:
        if stages & {"rtt", "output", "interrupt"}:
            await self.kernel_stages(stages)
        if "relay" in stages:
            await self.relay()
        if stages & {"start", "idle"}:
            await self.starts(stages)
