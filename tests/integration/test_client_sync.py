"""The synchronous Client and Session, and the plugin's fixtures, in plain (non-async) tests:
a real `kcserver` process (the `kcserver` fixture) and real ipykernel kernels."""

from __future__ import annotations

import threading

import pytest

from kallichore_trio.client import Client, ExitedEvent, KernelDied, Session, SessionNotFound
from kallichore_trio.client.pytest_plugin import KcServer


def test_kernel_session_runs_code(kernel_session: Session) -> None:
    result = kernel_session.execute("print(6 * 7)")
    assert result.stdout == "42\n" and result.ok


def test_stream_iterates_messages_as_they_come(kernel_session: Session) -> None:
    types = [msg.msg_type for msg in kernel_session.stream("print('a'); print('b')")]
    assert "execute_reply" in types and "stream" in types
    assert kernel_session.last_result.stdout == "a\nb\n"


def test_stopping_a_stream_early_leaves_the_session_usable(kernel_session: Session) -> None:
    for msg in kernel_session.stream("for i in range(1000): print(i)"):
        if msg.msg_type == "stream":
            break
    assert kernel_session.execute("print('after')").stdout.endswith("after\n")


def test_client_from_connection_file_and_environment(
    kcserver: KcServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert kcserver.connection_file is not None
    with Client.from_connection_file(kcserver.connection_file) as client:
        assert client.status().version
        with pytest.raises(SessionNotFound):
            client.session_info("no-such-session")
    monkeypatch.setenv("KALLICHORE_CONNECTION_FILE", str(kcserver.connection_file))
    with Client.find() as client:
        assert client.address.base_url == kcserver.address.base_url


def test_close_ends_the_loop_thread(kcserver: KcServer) -> None:
    client = kcserver.client()
    client.status()
    thread = client._loop._thread
    assert thread.is_alive()
    client.close()
    assert not thread.is_alive()
    assert thread not in threading.enumerate()


def test_a_dead_kernel_is_reported_with_its_exit_code(kc_client: Client) -> None:
    session = kc_client.start_kernel(env={"PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    with pytest.raises(KernelDied) as caught:
        session.execute("import os; os._exit(7)")
    assert caught.value.exit_code == 7
    assert any(isinstance(e, ExitedEvent) for e in session.recent_events)
    session.shutdown()


def test_wait_for_event_runs_the_action_once_listening(kc_client: Client) -> None:
    session = kc_client.start_kernel(env={"PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    session.execute("1")  # the channel is open
    exited = session.wait_for_event(lambda e: isinstance(e, ExitedEvent), what="exited event",
                                    after=session.kill, timeout=60)
    assert isinstance(exited, ExitedEvent)
    assert session.info().status == "exited"
    session.shutdown()
