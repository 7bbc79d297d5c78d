"""How a kernel process is started and signalled: argv, environment, startup shell, signals.

Kernels run in their own session and process group (`start_new_session`), so terminal signals
aimed at the daemon do not reach them and the whole group (the kernel and anything it spawned)
can be interrupted or killed at once.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import trio

from kallichore_trio.errors import KernelPathNotFound, ProcessStartFailed
from kallichore_trio.kernel.connection import (
    PortReservation,
    connection_info,
    registration_file_path,
    reserve_ports,
    write_kernel_connection_file,
)
from kallichore_trio.models import ConnectionInfo, NewSession, VarAction
from kallichore_trio.state import ProcessRef

log = logging.getLogger(__name__)

STARTUP_BEGIN = "KALLICHORE_STARTUP_BEGIN"
STARTUP_SUCCESS = "KALLICHORE_STARTUP_SUCCESS"

# Characters that make an argv element need quoting in the shell command line
# (docs/protocol.md §6.3).
_SPECIAL = set("\\\"'`${}()*?! \t\n;&|<>[]")


@attrs.define
class LaunchPlan:
    """What to spawn; None for an adopted kernel."""

    command: list[str]
    env: dict[str, str]
    cwd: str
    shell: str | None
    #: The file named in argv: a connection file, or for JEP 66 a registration file that the
    #: kernel writes nothing to and we write once the registration socket is bound.
    connection_file: Path
    handshake: bool = False


@attrs.frozen
class Prepared:
    """A launch ready to go: the plan, and (without the JEP 66 handshake) the ports reserved
    for the kernel and the connection info written to its connection file."""

    plan: LaunchPlan
    info: ConnectionInfo | None
    ports: PortReservation | None


def prepare(model: NewSession, *, session_id: str, key: str, runtime_dir: Path, cwd: str,
            env_actions: Sequence[VarAction], handshake: bool,
            extra_env: Mapping[str, str] | None = None) -> Prepared:
    """Reserve ports and write the connection file (or pick the registration file's path for
    the handshake), and build the command and its environment. ProcessStartFailed if the file
    cannot be written."""
    ports = None
    info = None
    try:
        if handshake:
            path = registration_file_path(runtime_dir, session_id)
        else:
            ports = reserve_ports()
            info = connection_info(ports.ports, key)
            path = write_kernel_connection_file(runtime_dir, session_id, info)
    except OSError as exc:
        if ports is not None:
            ports.release()
        raise ProcessStartFailed(f"could not prepare the connection file: {exc}") from None
    argv = substitute_connection_file(model.argv, path)
    env = resolve_env(os.environ, env_actions)
    # A kernel that watches this pid would end itself when the daemon dies: it must not
    # (docs/durability.md). We never set it; one inherited from our own parent goes too.
    env.pop("JPY_PARENT_PID", None)
    env.update(extra_env or {})  # the daemon's own additions (MCP: docs/mcp.md)
    command = build_command(model, argv, cwd)
    shell = command[0] if command[:1] != argv[:1] else None
    plan = LaunchPlan(command=command, env=env, cwd=cwd, shell=shell,
                      connection_file=path, handshake=handshake)
    return Prepared(plan, info, ports)


def check_kernel_path(argv: Sequence[str]) -> None:
    """argv[0] must exist: as a file when absolute, else in one of the PATH directories."""
    if not argv:
        return  # adopted sessions have no argv
    program = argv[0]
    if os.path.isabs(program):
        if not os.path.isfile(program):
            raise KernelPathNotFound(program)
    elif shutil.which(program) is None:
        raise KernelPathNotFound(program)


def substitute_connection_file(argv: Sequence[str], path: Path) -> list[str]:
    return [arg.replace("{connection_file}", str(path)) for arg in argv]


def resolve_env(base: Mapping[str, str], actions: Sequence[VarAction]) -> dict[str, str]:
    """Apply replace/append/prepend in order by plain concatenation (clients add separators)."""
    env = dict(base)
    for action in actions:
        current = env.get(action.name, "")
        if action.action == "replace":
            env[action.name] = action.value
        elif action.action == "append":
            env[action.name] = current + action.value
        else:
            env[action.name] = action.value + current
    return env


def _quote(arg: str) -> str:
    if arg == "":
        return "''"
    if not any(c in _SPECIAL for c in arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


def _login_flag(shell: str, has_arg: bool) -> str:
    if has_arg:
        return "-i"
    name = os.path.basename(shell)
    if name in ("bash", "zsh"):
        return "--login"
    if name in ("csh", "tcsh"):
        return "-d"
    return "-l"


def server_shell() -> str | None:
    """The daemon's own $SHELL if it exists, else bash, else sh (a session's env is not used)."""
    for candidate in (os.environ.get("SHELL"), "/bin/bash", "/bin/sh"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def build_command(model: NewSession, argv: Sequence[str], working_directory: str) -> list[str]:
    """The process to spawn: the kernel argv itself, or a shell that sets up and then runs it."""
    mode = model.startup_environment
    if model.run_in_shell and mode == "none":
        mode = "shell"
    shell = server_shell() if mode != "none" else None
    if shell is None:
        return list(argv)
    kernel = " ".join(_quote(a) for a in argv)
    arg = model.startup_environment_arg
    if mode == "command" and arg:
        command = (
            f"echo '{STARTUP_BEGIN}' && {{ {arg}; }} && echo '{STARTUP_SUCCESS}' && {kernel}"
        )
    elif mode == "script" and arg:
        script = Path(arg) if os.path.isabs(arg) else Path(working_directory) / arg
        if not script.exists():
            raise ProcessStartFailed(
                f"Startup script not found or cannot be read: '{script}' (no such file)"
            )
        if not script.is_file():
            raise ProcessStartFailed(f"Startup script '{script}' exists but is not a file")
        source = "source" if os.path.basename(shell) in ("csh", "tcsh") else "."
        command = (
            f"echo '{STARTUP_BEGIN}' && {{ {source} {_quote(str(script))}; }} && "
            f"echo '{STARTUP_SUCCESS}' && {kernel}"
        )
    else:
        command = kernel
    return [shell, _login_flag(shell, arg is not None), "-c", command]


def describe_command(command: Sequence[str]) -> str:
    return shlex.join(command)


async def spawn(command: Sequence[str], env: Mapping[str, str], cwd: str | None,
                output_files: tuple[Path, Path] | None = None) -> trio.Process:
    """Start the kernel in a new session, its stdout and stderr appended to `output_files`
    (created 0600, emptied first), or piped to us when there are none."""
    outputs: list[int] = []
    try:
        for path in output_files or ():
            outputs.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
                                   0o600))
        stdout, stderr = outputs if outputs else (subprocess.PIPE, subprocess.PIPE)
        return await trio.lowlevel.open_process(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        for fd in outputs:
            os.close(fd)


def signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to the process group led by `pid`; False if it no longer exists or is not
    ours to signal."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The group leader is gone and its id reused? Fall back to the process itself.
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            # Its id now belongs to another user's process: nothing of ours is left to signal,
            # and the caller (an interrupt, or the cleanup after an exit) must not fail on it.
            log.warning("process %d is not ours to signal (%s); not signalled", pid, sig)
            return False
    return True


def exit_code_of(returncode: int) -> int:
    """Kallichore's convention: the exit status, or -1 for a death by signal."""
    return returncode if returncode >= 0 else -1


def describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exit status: {returncode}"
    sig = -returncode
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = "unknown"
    return f"signal: {sig} ({name})"


def clean_startup_output(text: str) -> str:
    """Startup output without the marker lines that the startup shell command prints."""
    lines = [
        line
        for line in text.splitlines()
        if STARTUP_BEGIN not in line and STARTUP_SUCCESS not in line
    ]
    return "\n".join(lines)


def startup_context(mode: str, startup_arg: str | None, raw_output: str, shell: str | None,
                    *, exited: bool) -> str:
    """The `details` of a startup error: what the user should look at (docs/protocol.md §6.4).
    `mode` and `startup_arg` are the session's `startup_environment` and
    `startup_environment_arg`."""
    if mode in ("none", "shell") or not startup_arg:
        return "Kernel failed to start" if exited else "Kernel failed to connect to ZeroMQ sockets"
    noun = "script" if mode == "script" else "command"
    prefix = f"Shell: {shell}\n" if shell else ""
    prefix += f"Startup {noun}: {startup_arg}\n"
    if STARTUP_BEGIN not in raw_output:
        tail = (
            f"Startup {noun} could not be executed"
            if exited
            else f"Startup {noun} failed before execution"
        )
    elif STARTUP_SUCCESS not in raw_output:
        tail = f"Startup {noun} failed" if exited else f"Startup {noun} failed to execute"
    else:
        tail = "Kernel failed to start" if exited else "Kernel failed to connect to ZeroMQ sockets"
    return prefix + tail


def process_cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


#: How often a process that is not our child is checked for exit where there is no pidfd.
EXIT_POLL = 0.5


def open_pidfd(pid: int) -> int:
    """A pidfd for `pid` (Linux 5.3+); OSError or AttributeError where there is none."""
    return os.pidfd_open(pid)


async def wait_gone(ref: ProcessRef) -> None:
    """Return once the process `ref` names has ended. It is not our child (a kernel
    re-attached after a daemon crash), so there is no waitpid: a pidfd where the OS has them,
    else a poll every EXIT_POLL seconds."""
    try:
        fd = open_pidfd(ref.pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while ref.alive():
            await trio.sleep(EXIT_POLL)
        return
    try:
        if ref.alive():  # the pidfd is for the same process, not a successor on a reused pid
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
