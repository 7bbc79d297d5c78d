"""kallichore_trio.client.AsyncClient against the real daemon (in this test's nursery) and real
ipykernel kernels: server calls, errors, execution, input, comms, events, both transports."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from kallichore_trio.client import (
    AsyncClient,
    AsyncSession,
    AuthError,
    ChannelClosed,
    ExecutionTimeout,
    ExitedEvent,
    InputNotAnswered,
    KernelDied,
    KernelError,
    KernelSpecNotFound,
    ServerAddress,
    SessionExists,
    SessionNotFound,
    StartupFailed,
    StatusEvent,
    WorkingDirChanged,
)
from kallichore_trio.client.pytest_plugin import KERNEL_ENV
from tests.helpers import TOKEN, RunningDaemon, daemon_config, running_unix_daemon


def address_of(daemon: RunningDaemon, token: str | None = TOKEN) -> ServerAddress:
    return ServerAddress(daemon.base, token)


@pytest.fixture
async def client(daemon: RunningDaemon) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(address_of(daemon)) as kc:
        yield kc


@pytest.fixture
async def kernel(client: AsyncClient) -> AsyncSession:
    return await client.start_kernel(env=KERNEL_ENV)


async def test_execute_collects_streams_result_and_count(kernel: AsyncSession) -> None:
    result = await kernel.execute(
        "import sys\nprint('out')\nsys.stderr.write('err\\n'); sys.stderr.flush()\n6 * 7")
    assert result.ok and result.error is None
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.result == {"text/plain": "42"}
    assert result.execution_count == 1
    assert (await kernel.execute("1")).execution_count == 2


async def test_a_kernel_error_is_in_the_result_and_raised_on_demand(kernel: AsyncSession) -> None:
    result = await kernel.execute("print('before')\n1 / 0")
    assert result.status == "error"
    assert result.stdout == "before\n"
    assert result.error is not None and result.error.ename == "ZeroDivisionError"
    assert result.error.evalue == "division by zero" and result.error.traceback
    with pytest.raises(KernelError, match="ZeroDivisionError"):
        result.raise_for_error()


async def test_display_data_bundles_come_in_order_then_the_result(kernel: AsyncSession) -> None:
    result = await kernel.execute(
        "from IPython.display import HTML, display\n"
        "display(HTML('<b>one</b>'))\ndisplay({'text/plain': 'two'}, raw=True)\n'three'")
    kinds = [(o.kind, o.data.get("text/html") or o.data["text/plain"]) for o in result.outputs]
    assert kinds == [("display_data", "<b>one</b>"), ("display_data", "two"),
                     ("execute_result", "'three'")]


async def test_stream_yields_the_requests_messages_until_it_is_done(
    kernel: AsyncSession,
) -> None:
    async with kernel.stream("for i in range(3): print(i, flush=True)") as messages:
        seen = [(msg.channel, msg.msg_type) async for msg in messages]
        result = messages.result()
    assert ("shell", "execute_reply") in seen
    assert seen.count(("iopub", "stream")) >= 1
    assert ("iopub", "status") in seen
    assert result.stdout == "0\n1\n2\n"


async def test_input_requests_are_answered_from_a_list_or_a_callback(
    kernel: AsyncSession,
) -> None:
    code = "a = input('first? ')\nb = input('second? ')\nprint(a + '+' + b)"
    assert (await kernel.execute(code, input=["x", "y"])).stdout.endswith("x+y\n")
    prompts: list[str] = []

    def answer(prompt: str, password: bool) -> str:
        prompts.append(prompt)
        return prompt.upper()

    result = await kernel.execute(code, input=answer)
    assert prompts == ["first? ", "second? "]
    assert result.stdout.endswith("FIRST? +SECOND? \n")


async def test_input_answers_running_out_is_an_error_and_the_kernel_recovers(
    kernel: AsyncSession,
) -> None:
    with pytest.raises(InputNotAnswered, match="second"):
        await kernel.execute("input('first? '); input('second? ')", input=["only"])
    assert (await kernel.execute("print('alive')")).stdout == "alive\n"


async def test_complete_inspect_and_is_complete(kernel: AsyncSession) -> None:
    await kernel.execute("import os\nlong_variable_name = 1")
    completion = await kernel.complete("long_vari")
    assert "long_variable_name" in completion["matches"]
    inspection = await kernel.inspect("os.path.join", detail_level=0)
    assert inspection["found"] is True and "text/plain" in inspection["data"]
    assert (await kernel.is_complete("for i in range(3):"))["status"] == "incomplete"
    assert (await kernel.is_complete("x = 1"))["status"] == "complete"


async def test_a_comm_opened_by_the_client_exchanges_messages(kernel: AsyncSession) -> None:
    (await kernel.execute(
        "def _target(comm, open_msg):\n"
        "    comm.send({'opened_with': open_msg['content']['data']})\n"
        "    @comm.on_msg\n"
        "    def _echo(msg):\n"
        "        comm.send({'echo': msg['content']['data']})\n"
        "get_ipython().kernel.comm_manager.register_target('kc-echo', _target)\n"
    )).raise_for_error()
    comm = await kernel.comm_open("kc-echo", {"hello": 1})
    first = await comm.receive(timeout=30)
    assert first.content["data"] == {"opened_with": {"hello": 1}}
    await comm.send({"ping": 2})
    second = await comm.receive(timeout=30)
    assert second.content["data"] == {"echo": {"ping": 2}}
    await comm.close()


async def test_timeout_interrupts_the_kernel_and_keeps_what_came(kernel: AsyncSession) -> None:
    with pytest.raises(ExecutionTimeout) as caught:
        await kernel.execute("print('started', flush=True)\nimport time\ntime.sleep(120)",
                             timeout=2)
    message = str(caught.value)
    assert kernel.id in message and "execute_request" in message and "within 2 s" in message
    assert caught.value.partial.stdout == "started\n"
    # Interrupted: the kernel takes the next request.
    assert (await kernel.execute("print('next')")).stdout == "next\n"


async def test_a_kernel_that_dies_mid_execution_raises_kernel_died(
    kernel: AsyncSession,
) -> None:
    with pytest.raises(KernelDied) as caught:
        await kernel.execute("import os; os._exit(3)")
    assert caught.value.exit_code == 3
    assert kernel.id in str(caught.value)


async def test_events_are_typed(client: AsyncClient, kernel: AsyncSession,
                                tmp_path: Path) -> None:
    async with kernel.events() as events:
        await kernel.execute(f"import os; os.chdir({str(tmp_path)!r})")
        seen = []
        with trio.fail_after(30):
            async for event in events:
                seen.append(event)
                if isinstance(event, WorkingDirChanged):
                    break
    assert event.path == str(tmp_path)
    assert any(isinstance(e, StatusEvent) and e.status == "busy" for e in seen)
    exited = await kernel.wait_for_event(lambda e: isinstance(e, ExitedEvent),
                                         what="exited event", after=kernel.kill, timeout=30)
    assert isinstance(exited, ExitedEvent) and kernel.exit_code == exited.exit_code


async def test_server_calls_are_typed(client: AsyncClient, kernel: AsyncSession) -> None:
    status = await client.status()
    assert status.sessions == 1 and status.process_id == os.getpid()
    assert [s.session_id for s in await client.sessions()] == [kernel.id]
    info = await kernel.info()
    assert info.status in ("idle", "busy") and info.process_id is not None
    assert (await client.connection_info(kernel.id)).signature_scheme == "hmac-sha256"
    assert (await client.configuration()).resource_sample_interval_ms is not None
    await kernel.execute("x = 1")
    assert [e.input for e in await client.history(kernel.id)] == ["x = 1"]
    await kernel.interrupt()
    await kernel.restart()
    assert (await kernel.execute("print('x' in dir())")).stdout == "False\n"
    await kernel.shutdown()
    with pytest.raises(SessionNotFound, match=kernel.id):
        await client.session_info(kernel.id)


async def test_errors_are_mapped_from_the_answers(daemon: RunningDaemon,
                                                  client: AsyncClient) -> None:
    with pytest.raises(SessionNotFound, match="nope"):
        await client.session_info("nope")
    with pytest.raises(SessionNotFound):
        await client.session("nope").execute("1")
    async with AsyncClient(address_of(daemon, "wrong-token")) as stranger:
        with pytest.raises(AuthError):
            await stranger.sessions()
        assert (await stranger.status()).sessions == 0  # the one open route
    await client.start_kernel(session_id="twice", env=KERNEL_ENV)
    with pytest.raises(SessionExists, match="twice"):
        await client.start_kernel(session_id="twice")


async def test_a_kernel_that_fails_to_start_says_why_and_leaves_nothing(
    client: AsyncClient,
) -> None:
    argv = [sys.executable, "-c", "print('no kernel here', flush=True); raise SystemExit(3)"]
    with pytest.raises(StartupFailed) as caught:
        await client.start_kernel(argv=argv, session_id="broken")
    assert caught.value.exit_code == 3
    assert "no kernel here" in (caught.value.output or "")
    assert await client.sessions() == []


async def test_kernelspecs_are_found_on_jupyter_path(
    client: AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec_dir = tmp_path / "kernels" / "kc-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "KC test", "language": "python",
        "env": {"KC_SPEC_VAR": "from-spec", **KERNEL_ENV},
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    session = await client.start_kernel("kc-test")
    result = await session.execute("import os, sys; print(os.environ['KC_SPEC_VAR']); "
                                   "print(sys.executable)")
    # `python` in the spec is this interpreter, as jupyter_client launches it.
    assert result.stdout == f"from-spec\n{sys.executable}\n"
    assert (await session.info()).display_name == "KC test"
    with pytest.raises(KernelSpecNotFound, match="no-such-spec"):
        await client.start_kernel("no-such-spec")


async def test_a_second_client_evicts_the_first(daemon: RunningDaemon,
                                                kernel: AsyncSession) -> None:
    await kernel.execute("1")
    async with AsyncClient(address_of(daemon)) as other:
        assert (await other.session(kernel.id).execute("print(2)")).stdout == "2\n"
        with pytest.raises(ChannelClosed) as caught:
            await kernel.execute("3")
        assert caught.value.evicted
        await kernel.attach(force=True)
        assert (await kernel.execute("print(4)")).stdout == "4\n"


async def test_the_unix_socket_transport_and_its_per_session_sockets(
    nursery: trio.Nursery,
) -> None:
    import shutil
    import tempfile

    sock_dir = Path(tempfile.mkdtemp(prefix="kccl-", dir="/tmp"))
    try:
        config = daemon_config(sock_dir, transport="socket")
        async with running_unix_daemon(nursery, config) as unix_daemon:
            address = ServerAddress("http://localhost", TOKEN,
                                    uds=str(unix_daemon.address.socket_path))
            async with AsyncClient(address) as kc:
                session = await kc.start_kernel(env=KERNEL_ENV)
                assert (await session.execute("print(6 * 7)")).stdout == "42\n"
                info = await session.info()
                assert info.connected and info.socket_path is not None
                await session.shutdown()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
