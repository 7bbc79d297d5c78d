"""Benchmarks: kallichore-trio side by side with raw ZeroMQ (the floor) and Jupyter Server.

Run by `make bench` (BENCH_ARGS="--quick" for a smoke run). See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psutil
from harness import report
from harness.jupyter_server import JupyterServerTarget
from harness.kallichore import KallichoreTarget
from harness.raw import RawTarget
from harness.session import Target
from harness.workloads import STAGES, Bench, Params, Results

HERE = Path(__file__).resolve().parent
TARGETS = ("raw", "kallichore-trio", "jupyter-server")
RUN_ID = uuid.uuid4().hex


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_js = HERE.parent / ".bench-venv" / "bin" / "python"
    p.add_argument("--jupyter-server-python", default=str(default_js),
                   help="python of the environment that has jupyter_server")
    p.add_argument("--kallichore-python", default=sys.executable,
                   help="python that runs `-m kallichore_trio` (default: this one)")
    p.add_argument("--kallichore-command",
                   help="command for the daemon instead (e.g. a kcserver binary); "
                        "split on spaces, the tcp/port/token/connection-file flags are added")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)}")
    p.add_argument("--only", default="", help=f"subset of {','.join(STAGES)}")
    p.add_argument("--quick", action="store_true", help="short smoke run")
    p.add_argument("--idle-seconds", type=float, help="idle-cost window (default 60, quick 5)")
    p.add_argument("--concurrent", type=int, help="kernels started at once (default 20, quick 5)")
    p.add_argument("--flood-messages", type=int, help="stream messages per flood")
    p.add_argument("--lines", type=int, help="lines printed in the flushed-output cell")
    p.add_argument("--rtt-runs", type=int, help="measured execute round trips per target")
    p.add_argument("--rounds", type=int, help="interleaved rounds of the relay floods")
    p.add_argument("--rtt-rounds", type=int,
                   help="rounds the round trips are cut into (default 10, quick 2)")
    p.add_argument("--output-rounds", type=int,
                   help="rounds of the flushed-output cell (default 7, quick 1)")
    p.add_argument("--js-protocol", choices=("v1", "legacy"), default="v1",
                   help="Jupyter Server WebSocket protocol (v1 is JupyterLab 4's)")
    p.add_argument("--interrupt-mode", choices=("signal", "message"), default="signal",
                   help="kallichore-trio session interrupt_mode")
    p.add_argument("--profile", action="store_true",
                   help="run py-spy on each server during one extra flood (relay stage)")
    p.add_argument("--py-spy", help="py-spy binary (default: next to --jupyter-server-python)")
    p.add_argument("--results", default=str(HERE / "results" / "latest.json"))
    return p.parse_args(argv)  # fmt: skip


def make_params(a: argparse.Namespace) -> Params:
    p = Params.quick() if a.quick else Params()
    for field in ("idle_seconds", "concurrent", "flood_messages", "lines", "rtt_runs", "rounds",
                  "rtt_rounds", "output_rounds"):
        if getattr(a, field) is not None:
            setattr(p, field, getattr(a, field))
    return p


def write_kernelspecs(root: Path) -> None:
    """The same two kernels for every target: ipykernel of this venv, and the flood kernel."""
    specs = {
        "bench-python": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "bench-flood": [sys.executable, str(HERE / "flood_kernel.py"), "-f", "{connection_file}"],
    }
    for name, argv in specs.items():
        d = root / "kernels" / name
        d.mkdir(parents=True)
        spec = {"argv": argv, "display_name": name, "language": "python"}
        (d / "kernel.json").write_text(json.dumps(spec))


def stray_processes() -> list[psutil.Process]:
    """Processes of this run (marked by BENCH_RUN_ID in their environment) still alive."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("BENCH_RUN_ID") == RUN_ID:
                found.append(proc)
    return found


def machine_info() -> dict[str, object]:
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}  # fmt: skip


async def main_async(a: argparse.Namespace, work: Path) -> int:
    params = make_params(a)
    stages = set(a.only.split(",")) if a.only else set(STAGES)
    wanted = a.targets.split(",")
    unknown = (stages - set(STAGES)) | (set(wanted) - set(TARGETS))
    if unknown:
        print(f"unknown stage or target: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    log_dir = Path(a.results).parent
    log_dir.mkdir(parents=True, exist_ok=True)
    kt_command = (a.kallichore_command.split() if a.kallichore_command
                  else [a.kallichore_python, "-m", "kallichore_trio"])  # fmt: skip
    candidates: dict[str, Target] = {
        "raw": RawTarget(),
        "kallichore-trio": KallichoreTarget(kt_command, log_dir, a.interrupt_mode),
        "jupyter-server": JupyterServerTarget(
            a.jupyter_server_python, log_dir, work / "jupyter", a.js_protocol
        ),
    }
    results = Results(params)
    info = machine_info()
    started: list[Target] = []
    t_start = time.perf_counter()
    try:
        for name in TARGETS:
            if name not in wanted:
                continue
            print(f"* starting {name}", flush=True)
            try:
                await candidates[name].start()
                started.append(candidates[name])
            except Exception as exc:
                results.error(name, "start-target", exc)
                await candidates[name].stop()
        py_spy = None
        if a.profile:
            py_spy = a.py_spy or str(Path(a.jupyter_server_python).parent / "py-spy")
        await Bench(started, params, results, py_spy, log_dir).run(stages)
    finally:
        for t in started:
            await t.stop()
    info["loadavg_end"] = os.getloadavg()
    info["duration_s"] = round(time.perf_counter() - t_start, 1)
    strays = stray_processes()
    if strays:
        print(f"! {len(strays)} process(es) of this run left behind; killing them", flush=True)
        for proc in strays:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    rows = report.build(results.metrics)
    out = {"machine": info, "targets": wanted, "stages": sorted(stages),
           "js_protocol": a.js_protocol, "kallichore_interrupt_mode": a.interrupt_mode,
           **results.as_dict(), "table": rows, "strays": len(strays)}  # fmt: skip
    Path(a.results).write_text(json.dumps(out, indent=2))
    print()
    print(f"N = {params.concurrent} concurrent sessions; {info['cpus']} CPUs; "
          f"load {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}; "
          f"{info['duration_s']} s")  # fmt: skip
    print(report.render(rows))
    for target, errs in results.errors.items():
        for stage, text in errs.items():
            print(f"error: {target} / {stage}: {text.splitlines()[0][:200]}")
    print(f"\nresults: {a.results}")
    return 1 if results.errors or strays else 0


def prepare_environment(work: Path, run_id: str) -> None:
    """Kernelspecs and an empty IPython profile under `work`, for this process and its children;
    every process of the run carries `run_id` (see stray_processes)."""
    write_kernelspecs(work / "jupyter")
    (work / "ipython").mkdir()
    os.environ.update(
        JUPYTER_PATH=str(work / "jupyter"),
        IPYTHONDIR=str(work / "ipython"),
        BENCH_RUN_ID=run_id,
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )


def main() -> int:
    a = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        prepare_environment(work, RUN_ID)
        return asyncio.run(main_async(a, work))


if __name__ == "__main__":
    sys.exit(main())
