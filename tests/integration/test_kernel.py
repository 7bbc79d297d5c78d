"""kernel.Kernel on its own: no session, no daemon, a recorder for its events.

The Kernel is built from `KernelParams` and reports through `KernelEvents`; here a recorder
implements that protocol and a real purpose-built kernel (tests/kernels/mini_kernel.py) runs on
real ZeroMQ sockets. That the kernel starts, relays, sends what its events hand back, stops
and fails to start with nothing of the session layer around proves the separation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq

from kallichore_trio import wire
from kallichore_trio.config import Timeouts
from kallichore_trio.errors import StartupFailure
from kallichore_trio.kernel import launch
from kallichore_trio.kernel.connection import (
    connection_info,
    new_key,
    reserve_ports,
    write_kernel_connection_file,
)
from kallichore_trio.kernel.kernel import Kernel, Lifecycle
from kallichore_trio.kernel.launch import LaunchPlan
from kallichore_trio.kernel.params import KernelParams
from kallichore_trio.kernel.startup import Probe
from kallichore_trio.models import ConnectionInfo
from tests.helpers import KERNELS


class Recorder:
    """A KernelEvents that keeps everything it is told and wakes whoever waits for it."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, wire.KernelMessage]] = []
        self.outputs: list[tuple[str, str]] = []
        self.exits: list[int] = []
        self.heartbeats: list[bool] = []
        self.spawn_failures: list[str] = []
        self.handshakes: list[ConnectionInfo] = []
        self.traffic = 0
        #: Returned (once) for the execute_reply to the given msg_id: the kernel must send it.
        self.due_after: dict[str, wire.ClientMessage] = {}
        self._changed = trio.Event()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    # ---- KernelEvents ----

    def on_kernel_message(
        self, msg: wire.KernelMessage, channel: str
    ) -> wire.ClientMessage | None:
        self.messages.append((channel, msg))
        self._touch()
        if msg.msg_type == "execute_reply":
            return self.due_after.pop(msg.parent_msg_id or "", None)
        return None

    def on_traffic(self) -> None:
        self.traffic += 1

    async def wait_for_room(self) -> None:
        await trio.lowlevel.checkpoint()

    def on_output(self, stream: str, text: str) -> None:
        self.outputs.append((stream, text))
        self._touch()

    def on_kernel_exit(self, kernel: Kernel, code: int) -> None:
        self.exits.append(code)
        self._touch()

    def on_spawn_failed(self, reason: str) -> None:
        self.spawn_failures.append(reason)
        self._touch()

    def on_heartbeat(self, alive: bool) -> None:
        self.heartbeats.append(alive)
        self._touch()

    def on_handshake(self, info: ConnectionInfo) -> None:
        self.handshakes.append(info)
        self._touch()

    # ---- queries ----

    def seen(self, channel: str, msg_type: str, parent: str) -> bool:
        return any(ch == channel and m.msg_type == msg_type and m.parent_msg_id == parent
                   for ch, m in self.messages)


def execute(code: str) -> wire.ClientMessage:
    return wire.ClientMessage(
        msg_id=uuid.uuid4().hex, msg_type="execute_request", parent=None, channel="shell",
        content={"code": code, "silent": False}, metadata={},
    )


@pytest.fixture
def zmq_context() -> Any:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@asynccontextmanager
async def mini_kernel(
    tmp_path: Path, zmq_context: Any, mode: str = "normal", **timeouts: float
) -> AsyncIterator[tuple[Kernel, Recorder, Path]]:
    """A Kernel for tests/kernels/mini_kernel.py in `mode`, its recorder, its connection file;
    not started yet."""
    key = new_key()
    params = KernelParams(
        session_id=f"kernel-test-{uuid.uuid4().hex[:8]}", username="tester",
        protocol_version="5.3", key=key, signer=wire.Signer(key.encode()),
        zmq_context=zmq_context, timeouts=Timeouts(**timeouts), startup_timeout=15.0,
    )
    ports = reserve_ports()
    info = connection_info(ports.ports, key)
    path = write_kernel_connection_file(tmp_path, params.session_id, info)
    plan = LaunchPlan(command=[sys.executable, str(KERNELS / "mini_kernel.py"), str(path), mode],
                      env=dict(os.environ), cwd=str(tmp_path), shell=None, connection_file=path)
    recorder = Recorder()
    yield Kernel(recorder, params, info=info, plan=plan, ports=ports), recorder, path


async def test_a_kernel_runs_relays_and_stops_without_a_session(
    tmp_path: Path, zmq_context: Any
) -> None:
    async with mini_kernel(tmp_path, zmq_context) as (kernel, recorder, path), \
            trio.open_nursery() as nursery:
        assert kernel.lifecycle is Lifecycle.STARTING and not kernel.running
        reply = await nursery.start(kernel.run)
        assert reply["implementation"] == "mini"
        assert kernel.lifecycle is Lifecycle.RUNNING and kernel.running
        assert "running" in repr(kernel)
        await recorder.wait_for(lambda: any("mini kernel pid" in t for _, t in recorder.outputs))
        assert recorder.outputs[0][0] == "stdout"

        request = execute("1")
        await kernel.send(request)
        await recorder.wait_for(lambda: recorder.seen("iopub", "status", request.msg_id)
                                and recorder.seen("shell", "execute_reply", request.msg_id))
        assert recorder.traffic > 0
        # The start's own kernel_info exchange was not relayed, busy/idle statuses included.
        assert not any(m.msg_type == "kernel_info_reply" for _, m in recorder.messages)
        assert all(m.parent_msg_id not in kernel._probe_ids for _, m in recorder.messages)

        # The kernel sends its own shutdown_request (control) and the mini kernel exits on it.
        await kernel.stop(restart=False, grace=10)
        assert kernel.exited.is_set()
        assert recorder.exits == [0]
        assert kernel.lifecycle is Lifecycle.EXITED and not kernel.running and kernel.started
        with trio.fail_after(10):
            await kernel.finished.wait()
    assert not path.exists()  # the connection file goes with the incarnation
    assert kernel.pid is None


async def test_a_request_the_events_hand_back_is_sent_by_the_pump(
    tmp_path: Path, zmq_context: Any
) -> None:
    """on_kernel_message may return a request now due (the execution queue's next one): the
    kernel sends it from the pump that delivered the message."""
    async with mini_kernel(tmp_path, zmq_context) as (kernel, recorder, _), \
            trio.open_nursery() as nursery:
        await nursery.start(kernel.run)
        first, second = execute("1"), execute("2")
        recorder.due_after[first.msg_id] = second
        await kernel.send(first)
        await recorder.wait_for(lambda: recorder.seen("shell", "execute_reply", second.msg_id))
        assert not recorder.due_after
        kernel.kill()
        await recorder.wait_for(lambda: bool(recorder.exits))
        assert recorder.exits == [launch.exit_code_of(-signal.SIGKILL)]
        nursery.cancel_scope.cancel()


async def test_heartbeats_are_reported(tmp_path: Path, zmq_context: Any) -> None:
    async with mini_kernel(tmp_path, zmq_context, heartbeat_period=0.2) as (kernel, recorder, _), \
            trio.open_nursery() as nursery:
        await nursery.start(kernel.run)
        await recorder.wait_for(lambda: recorder.heartbeats.count(True) >= 2)
        assert False not in recorder.heartbeats
        nursery.cancel_scope.cancel()


async def test_a_kernel_that_exits_during_startup_fails_to_start(
    tmp_path: Path, zmq_context: Any
) -> None:
    async with mini_kernel(tmp_path, zmq_context, "exit_at_once") as (kernel, recorder, path):
        async with trio.open_nursery() as nursery:
            with pytest.raises(StartupFailure) as failure:
                await nursery.start(kernel.run)
    assert failure.value.exit_code == 3
    assert "failing on purpose" in failure.value.output
    assert kernel.lifecycle is Lifecycle.FAILED and not kernel.started
    assert "failed" in repr(kernel)
    # The exit is reported like any other (the session decides what a client sees).
    assert recorder.exits == [3]
    assert recorder.messages == []
    assert kernel.finished.is_set() and not path.exists()


async def test_a_command_that_cannot_be_spawned_is_reported(
    tmp_path: Path, zmq_context: Any
) -> None:
    async with mini_kernel(tmp_path, zmq_context) as (kernel, recorder, _):
        assert kernel.plan is not None
        kernel.plan.command = [str(tmp_path / "no-such-kernel")]
        async with trio.open_nursery() as nursery:
            with pytest.raises(StartupFailure):
                await nursery.start(kernel.run)
    assert len(recorder.spawn_failures) == 1
    assert "failed to spawn process" in recorder.spawn_failures[0]
    assert kernel.lifecycle is Lifecycle.FAILED


def _modules_loaded_by(imports: str) -> set[str]:
    """The modules a fresh interpreter holds after `imports`."""
    code = f"import sys\n{imports}\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_the_kernel_layer_imports_nothing_above_it() -> None:
    loaded = _modules_loaded_by(
        "import kallichore_trio.kernel.kernel, kallichore_trio.kernel.startup, "
        "kallichore_trio.kernel.launch, kallichore_trio.kernel.connection, "
        "kallichore_trio.kernel.resources")
    assert "kallichore_trio.kernel.kernel" in loaded
    above = ("kallichore_trio.session", "kallichore_trio.registry", "kallichore_trio.daemon",
             "kallichore_trio.api", "quart", "hypercorn")
    assert sorted(m for m in loaded if m.startswith(above)) == []


def test_the_pure_cores_import_no_io() -> None:
    loaded = _modules_loaded_by(
        "import kallichore_trio.core.relay, kallichore_trio.core.state, "
        "kallichore_trio.core.queue, kallichore_trio.core.outbox, kallichore_trio.core, "
        "kallichore_trio.wire")
    assert "kallichore_trio.core.relay" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in ("trio", "zmq", "quart")) == []


def _kernel_message(msg_type: str, parent: str, content: bytes) -> wire.KernelMessage:
    return wire.KernelMessage(
        identities=(), header={"msg_id": uuid.uuid4().hex, "msg_type": msg_type},
        parent_header={"msg_id": parent, "msg_type": "kernel_info_request"},
        metadata=b"{}", content=content)


def test_the_probe_keeps_the_first_reply_and_notes_iopub() -> None:
    probe = Probe()
    probe.on_traffic("iopub", _kernel_message("status", "p1", b'{"execution_state": "busy"}'))
    assert probe.iopub_seen.is_set() and probe.reply is None
    probe.on_traffic("shell", _kernel_message("kernel_info_reply", "p1", b'{"banner": "a"}'))
    probe.on_traffic("shell", _kernel_message("kernel_info_reply", "p2", b'{"banner": "b"}'))
    assert probe.reply == {"banner": "a"}


def test_a_probe_reply_that_is_not_an_object_counts_as_empty() -> None:
    probe = Probe()
    probe.on_traffic("shell", _kernel_message("kernel_info_reply", "p1", b"[1, 2]"))
    assert probe.reply == {} and not probe.iopub_seen.is_set()
