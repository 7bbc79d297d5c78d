"""`kc`: the daemon from a terminal (docs/client.md).

    kc start python3 --id py && kc exec py 'print(6*7)'

The daemon is found from --connection-file, $KALLICHORE_CONNECTION_FILE, --url (token from
--token or $KALLICHORE_TOKEN), else the newest running kcserver's default connection file.
Global options go before or after the subcommand. Tables and colours only on a terminal;
`--json` prints JSON for scripts. Exit status: 0, 1 on an error (one line on stderr saying
what to do), 2 on bad usage, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from kallichore_trio.client import kernelspecs
from kallichore_trio.client import messages as m
from kallichore_trio.client.discovery import find_server
from kallichore_trio.client.errors import ClientError
from kallichore_trio.client.kc_output import Output, Printer, print_notices, run_interruptibly
from kallichore_trio.client.results import ExecutionResult
from kallichore_trio.client.sync import Client, Session, _spawn
from kallichore_trio.models import converter


class Usage(Exception):
    pass


def _global_options(parser: argparse.ArgumentParser, *, sub: bool) -> None:
    # On subparsers the defaults are SUPPRESS, so an option given before the subcommand is not
    # reset by the subparser's default.
    default = argparse.SUPPRESS if sub else None
    parser.add_argument("--connection-file", metavar="PATH", default=default,
                        help="the daemon's connection file")
    parser.add_argument("--url", metavar="URL", default=default,
                        help="the daemon's URL (http://127.0.0.1:PORT or unix:PATH)")
    parser.add_argument("--token", metavar="TOKEN", default=default,
                        help="bearer token with --url (prefer $KALLICHORE_TOKEN: a command "
                             "line is visible to other users)")
    parser.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if sub else False,
                        help="print JSON (for scripts)")
    parser.add_argument("--timeout-scale", type=float, metavar="X",
                        default=argparse.SUPPRESS if sub else 1.0,
                        help="multiply every timeout by X")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kc", description="Talk to a kallichore-trio daemon "
                                     "(kcserver): sessions, kernels, code.")
    _global_options(parser, sub=False)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=help, description=help)
        _global_options(p, sub=True)
        return p

    add("status", "the daemon's status")
    add("ls", "list sessions")
    p = add("start", "start a kernel from a kernelspec")
    p.add_argument("kernelspec", help="kernelspec name (kc kernelspecs lists them)")
    p.add_argument("--id", dest="session_id", help="session id (default: <kernelspec>-<hex>)")
    p.add_argument("--cwd", help="the kernel's working directory (default: here)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set a variable in the kernel's environment (repeatable)")
    p = add("exec", "run code in a session and print its output as it comes")
    p.add_argument("session_id", metavar="ID")
    p.add_argument("code", help="the code, or - to read it from stdin")
    p.add_argument("--timeout", type=float, help="seconds before the kernel is interrupted")
    p.add_argument("--images-dir", default=".", metavar="DIR",
                   help="where images from the output are saved (default: here)")
    for name, what in (("interrupt", "interrupt a kernel"), ("restart", "restart a kernel"),
                       ("kill", "kill a kernel (the session stays)"),
                       ("rm", "kill a kernel if it runs and remove its session")):
        add(name, what).add_argument("session_id", metavar="ID")
    p = add("logs", "the kernel's output and status events (attaches: see docs/client.md)")
    p.add_argument("session_id", metavar="ID")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until Ctrl-C")
    p = add("attach", "an interactive console on a session (Ctrl-C interrupts the kernel, "
                      "Ctrl-D detaches and leaves it running)")
    p.add_argument("session_id", metavar="ID")
    add("shutdown", "stop every kernel, then the daemon")
    add("kernelspecs", "the kernelspecs `kc start` can use")
    return parser


def _connect(ns: argparse.Namespace) -> Client:
    token = ns.token if ns.token is not None else os.environ.get("KALLICHORE_TOKEN")
    address = find_server(ns.connection_file, url=ns.url, token=token)
    return Client(address, timeout_scale=ns.timeout_scale)


# ---- commands ----------------------------------------------------------------------------


def cmd_status(client: Client, ns: argparse.Namespace, io: Output) -> int:
    status = client.status()
    if io.json:
        io.print_json(converter.unstructure(status))
        return 0
    rows = [["daemon", client.address.describe()], ["version", status.version],
            ["pid", str(status.process_id)], ["uptime", _duration(status.uptime_seconds)],
            ["sessions", f"{status.sessions} ({status.active} running)"],
            ["busy", "yes" if status.busy else "no"]]
    io.table(["", ""], rows)
    return 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


def cmd_ls(client: Client, ns: argparse.Namespace, io: Output) -> int:
    sessions = client.sessions()
    if io.json:
        io.print_json([converter.unstructure(s) for s in sessions])
        return 0
    now = dt.datetime.now(dt.UTC)
    rows = []
    for s in sessions:
        usage = s.resource_usage
        rows.append([
            s.session_id, s.display_name, s.status,
            "" if s.process_id is None else str(s.process_id),
            "yes" if s.connected else "no",
            "" if usage is None else f"{usage.cpu_percent}%",
            "" if usage is None else _bytes(usage.memory_bytes),
            _duration((now - s.started).total_seconds()),
        ])
    io.table(["ID", "KERNEL", "STATUS", "PID", "CLIENT", "CPU", "MEMORY", "AGE"], rows)
    return 0


def cmd_start(client: Client, ns: argparse.Namespace, io: Output) -> int:
    env = {}
    for item in ns.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise Usage(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    cwd = str(Path(ns.cwd).absolute()) if ns.cwd else None

    def start() -> Session:
        return client.start_kernel(ns.kernelspec, session_id=ns.session_id,
                                   working_directory=cwd, env=env or None)

    if io.tty and not io.json and io.err.isatty():
        from rich.console import Console

        with Console(file=io.err).status(f"Starting {ns.kernelspec}..."):
            session = start()
    else:
        session = start()
    if io.json:
        io.print_json({"session_id": session.id})
    else:
        io.out.write(session.id + "\n")
    return 0


def _terminal_input(io: Output) -> Callable[[str, bool], Any] | None:
    if not sys.stdin.isatty():
        return None

    async def answer(prompt: str, password: bool) -> str:
        import getpass

        import trio

        reader = getpass.getpass if password else input
        return await trio.to_thread.run_sync(reader, prompt)

    return answer


def cmd_exec(client: Client, ns: argparse.Namespace, io: Output) -> int:
    code = sys.stdin.read() if ns.code == "-" else ns.code
    session = client.session(ns.session_id)
    client.session_info(ns.session_id)  # SessionNotFound before attaching
    printer = None if io.json else Printer(io, ns.session_id, Path(ns.images_dir))
    answer = None if ns.code == "-" else _terminal_input(io)
    session.on_notice = print_notices(io, ns.session_id)

    async def job() -> ExecutionResult:
        return await session.asession.execute(code, timeout=ns.timeout, on_message=printer,
                                              input=answer)

    box = run_interruptibly(client, session, job)
    result: ExecutionResult = box["value"]
    if io.json:
        io.print_json(attrs.asdict(result))
    if box["interrupted"]:
        return 130
    return 0 if result.ok else 1


def cmd_simple(client: Client, ns: argparse.Namespace, io: Output) -> int:
    action = {"interrupt": client.interrupt, "restart": client.restart, "kill": client.kill,
              "rm": client.remove_session}[ns.command]
    action(ns.session_id)
    if io.json:
        io.print_json({"session_id": ns.session_id, "done": ns.command})
    return 0


def _event_line(event: m.KernelEvent) -> str | None:
    if isinstance(event, m.OutputEvent):
        return event.text.rstrip("\n")
    if isinstance(event, m.StatusEvent):
        return f"[status: {event.status}{f' ({event.reason})' if event.reason else ''}]"
    if isinstance(event, m.ExitedEvent):
        return f"[exited with code {event.exit_code}]"
    if isinstance(event, m.WorkingDirChanged):
        return f"[working directory: {event.path}]"
    return None


def cmd_logs(client: Client, ns: argparse.Namespace, io: Output) -> int:
    session = client.session(ns.session_id)
    client.session_info(ns.session_id)

    notices = print_notices(io, ns.session_id)

    def show(event: m.KernelEvent) -> None:
        notices(event)
        if io.json:
            io.print_json({"event": event.name, **attrs.asdict(event)})
            return
        line = _event_line(event)
        if line is not None:
            io.out.write(line + "\n")
            io.out.flush()

    async def job() -> None:
        import trio

        # Events buffered while nobody was attached come first, then live ones; without -f
        # stop once nothing has come for a moment.
        async with session.asession.events() as events:
            while True:
                if ns.follow:
                    event = await events.receive()
                else:
                    with trio.move_on_after(0.5):
                        event = await events.receive()
                        show(event)
                        continue
                    return
                show(event)

    done = threading.Event()

    async def run() -> None:
        try:
            await job()
        finally:
            done.set()

    client._run(_spawn, client.aclient._nursery, run)
    try:
        while not done.is_set():
            done.wait()
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_shutdown(client: Client, ns: argparse.Namespace, io: Output) -> int:
    client.shutdown()
    if io.json:
        io.print_json({"shutdown": True})
    return 0


def cmd_kernelspecs(ns: argparse.Namespace, io: Output) -> int:
    specs = kernelspecs.kernelspecs()
    if io.json:
        io.print_json(specs)
        return 0
    rows = [[name, info["spec"].get("display_name", ""), info["spec"].get("language", ""),
             " ".join(kernelspecs.resolve_argv(info["spec"].get("argv", [])))]
            for name, info in sorted(specs.items())]
    io.table(["NAME", "DISPLAY NAME", "LANGUAGE", "ARGV"], rows)
    return 0


COMMANDS: dict[str, Callable[[Client, argparse.Namespace, Output], int]] = {
    "status": cmd_status, "ls": cmd_ls, "start": cmd_start, "exec": cmd_exec,
    "interrupt": cmd_simple, "restart": cmd_simple, "kill": cmd_simple, "rm": cmd_simple,
    "logs": cmd_logs, "shutdown": cmd_shutdown,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    io = Output(sys.stdout, sys.stderr, ns.json, sys.stdout.isatty())
    try:
        if ns.command == "kernelspecs":
            return cmd_kernelspecs(ns, io)
        if ns.command == "attach":
            from kallichore_trio.client.kc_attach import attach

            with _connect(ns) as client:
                return attach(client, ns.session_id, io)
        with _connect(ns) as client:
            return COMMANDS[ns.command](client, ns, io)
    except Usage as exc:
        parser.error(str(exc))
    except ClientError as exc:
        print(f"kc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
