"""A/B: two versions of the daemon and the raw floor, round trips interleaved in one run.

    git worktree add /tmp/kt-base <commit>
    .venv/bin/python bench/ab.py /tmp/kt-base .            # ipykernel, 10 rounds of 30
    .venv/bin/python bench/ab.py /tmp/kt-base . --repeat 3 --both-ways --rounds 20
    .venv/bin/python bench/ab.py /tmp/kt-base . --kind flood --per-round 100
    .venv/bin/python bench/ab.py /tmp/kt-base . --per-round 1 --warmup 2 \
        --code "for i in range(3000): print(i, flush=True)"   # flushed output

Each argument is a source tree whose `kallichore_trio` package is run (through PYTHONPATH, which
wins over the editable install). One kernel per target, all alive at once; each round runs
`per_round` round trips on every target, in alternating order, so drift and noisy neighbours hit
all three alike. A change in the daemon shows as `new/base`; `rounds new<base` says how many
rounds agree. A/A runs (the same tree twice) gave new/base 0.95-1.05 on 2 cores, and the
"new" slot itself can be 1-4 % slower: `--repeat 3 --both-ways` runs each way round three
times and prints sqrt(mean forward / mean swapped), the effect with that bias cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from harness import procs
from harness.kallichore import KallichoreTarget
from harness.raw import RawTarget
from harness.session import Session, Target
from run_all import prepare_environment


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path, help="source tree of the base version")
    p.add_argument("new", type=Path, help="source tree of the new version")
    p.add_argument("--kind", choices=("ipykernel", "flood"), default="ipykernel")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-round", type=int, default=30)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--code", default="1+1", help="the cell each round trip runs")
    p.add_argument("--repeat", type=int, default=1, help="runs (each a fresh set of daemons)")
    p.add_argument("--both-ways", action="store_true",
                   help="after each run, one with base and new swapped; print the effect with "
                        "the slot's bias cancelled")
    return p.parse_args()


def daemon(tree: Path, log_dir: Path) -> KallichoreTarget:
    src = str(tree.resolve())
    where = subprocess.run(
        ["env", f"PYTHONPATH={src}", sys.executable, "-P", "-c",
         "import kallichore_trio; print(kallichore_trio.__file__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not where.startswith(src + "/"):
        sys.exit(f"{tree}: kallichore_trio resolves to {where}, not to this tree")
    # -P: without it `-m` puts the working directory first on sys.path, ahead of PYTHONPATH,
    # and a run started in a checkout would test that checkout twice.
    return KallichoreTarget(["env", f"PYTHONPATH={src}", sys.executable, "-P", "-m",
                             "kallichore_trio"],
                            log_dir)  # fmt: skip


async def measure(
    a: argparse.Namespace, base: Path, new: Path, log_dir: Path
) -> tuple[float, float]:
    """One run; returns new/base of the median round trip and of the daemon CPU."""
    targets: dict[str, Target] = {
        "raw": RawTarget(),
        "base": daemon(base, log_dir / "base"),
        "new": daemon(new, log_dir / "new"),
    }
    sessions: dict[str, Session] = {}
    try:
        for name, target in targets.items():
            await target.start()
            sessions[name] = await target.open_session(a.kind)
        for s in sessions.values():
            for _ in range(a.warmup):
                await s.execute(a.code, timeout=120)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        medians: dict[str, list[float]] = {name: [] for name in sessions}
        cpu = dict.fromkeys(sessions, 0.0)
        for r in range(a.rounds):
            for name in list(sessions)[:: 1 if r % 2 == 0 else -1]:
                pid = targets[name].server_pid()
                cpu0 = procs.cpu_seconds(pid) if pid else 0.0
                this_round = []
                for _ in range(a.per_round):
                    t0 = time.perf_counter()
                    await sessions[name].execute(a.code, timeout=120)
                    this_round.append(time.perf_counter() - t0)
                if pid:
                    cpu[name] += procs.cpu_seconds(pid) - cpu0
                times[name] += this_round
                medians[name].append(statistics.median(this_round))
    finally:
        for s in sessions.values():
            await s.close()
        for target in targets.values():
            await target.stop()
    n = a.rounds * a.per_round
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    agree = sum(new < base for new, base in zip(medians["new"], medians["base"], strict=True))
    print(f"{a.kind}, {a.code!r}, {a.rounds} rounds of {a.per_round}: "
          f"median raw {med['raw']:.3f} ms, base {med['base']:.3f} ms, new {med['new']:.3f} ms")
    print(f"  base/raw {med['base'] / med['raw']:.3f}  new/raw {med['new'] / med['raw']:.3f}  "
          f"new/base {med['new'] / med['base']:.3f}  rounds new<base {agree}/{a.rounds}")
    print(f"  daemon CPU per round trip: base {cpu['base'] / n * 1e6:.0f} us, "
          f"new {cpu['new'] / n * 1e6:.0f} us")  # fmt: skip
    return med["new"] / med["base"], cpu["new"] / cpu["base"] if cpu["base"] else 1.0


def summarize(forward: list[tuple[float, float]], swapped: list[tuple[float, float]]) -> None:
    """The new tree's effect with the "new" slot's own bias cancelled: in a forward run
    new/base = effect * bias, in a swapped one effect**-1 * bias."""
    for what, i in (("round trip", 0), ("daemon CPU", 1)):
        f = statistics.fmean(r[i] for r in forward)
        w = statistics.fmean(r[i] for r in swapped)
        print(f"{what}: forward {f:.3f}, swapped {w:.3f} -> effect of the new tree "
              f"{(f / w) ** 0.5:.3f}, slot bias {(f * w) ** 0.5:.3f}")


def main() -> int:
    a = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        work = Path(tmp)
        prepare_environment(work, uuid.uuid4().hex)
        for sub in ("base", "new"):
            (work / "logs" / sub).mkdir(parents=True)
        forward: list[tuple[float, float]] = []
        swapped: list[tuple[float, float]] = []
        for _ in range(a.repeat):
            forward.append(asyncio.run(measure(a, a.base, a.new, work / "logs")))
            if a.both_ways:
                print("  (swapped: base and new trade places)")
                swapped.append(asyncio.run(measure(a, a.new, a.base, work / "logs")))
        if a.both_ways:
            summarize(forward, swapped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
