"""The kcserver command line: flags, transport inference, validation, token, announce."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import stat
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from kallichore_trio import cli
from kallichore_trio.config import KALLICHORE_VERSION, Config, OutboxLimits


def parse(*argv: str, environ: dict[str, str] | None = None) -> Config:
    ns = cli.build_parser().parse_args(list(argv))
    return cli.config_from_args(ns, environ or {}, err=io.StringIO())


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {"port": 0, "transport": "tcp", "resource_sample_interval_ms": 1000,
              "idle_shutdown_hours": None, "log_level": "info", "log_file": None}),
        (["--port", "8181"], {"port": 8181}),
        (["-p", "9"], {"port": 9}),
        (["--idle-shutdown-hours", "0"], {"idle_shutdown_hours": 0}),
        (["-i", "24"], {"idle_shutdown_hours": 24}),
        (["--resource-sample-interval", "0"], {"resource_sample_interval_ms": 0}),
        (["-r", "250"], {"resource_sample_interval_ms": 250}),
        (["--log-level", "trace"], {"log_level": "trace"}),
        (["-l", "WARN"], {"log_level": "warn"}),
        (["--log-file", "/tmp/k.log"], {"log_file": Path("/tmp/k.log")}),
        (["--connection-file", "/tmp/c.json"],
         {"connection_file": Path("/tmp/c.json"), "transport": "socket"}),
        (["--handshake-socket", "/tmp/h.sock"],
         {"handshake_socket": Path("/tmp/h.sock"), "transport": "socket"}),
        (["--socket-dir", "/tmp/socks"], {"socket_dir": Path("/tmp/socks"), "transport": "tcp"}),
        (["--unix-socket", "/tmp/api.sock"],
         {"unix_socket": Path("/tmp/api.sock"), "transport": "socket"}),
        (["--token", "none"], {"token": None}),
        (["--busy-poll", "0"], {"busy_poll": 0.0}),
        (["--busy-poll", "0.5"], {"busy_poll": 0.0005}),
        (["--busy-poll", "100"], {"busy_poll": 0.1}),
        ([], {"resource_include_children": True}),
        (["--resource-include-children", "false"], {"resource_include_children": False}),
        (["--resource-include-children", "True"], {"resource_include_children": True}),
        ([], {"outbox": OutboxLimits()}),
        (["--outbox-frames", "200"],
         {"outbox": OutboxLimits(max_frames=200, max_bytes=OutboxLimits().max_bytes)}),
        (["--outbox-mib", "8"],
         {"outbox": OutboxLimits(max_frames=OutboxLimits().max_frames, max_bytes=8 << 20)}),
        (["--outbox-frames", "100", "--outbox-mib", "1"],
         {"outbox": OutboxLimits(max_frames=100, max_bytes=1 << 20)}),
    ],
)
def test_flags(argv: list[str], expected: dict[str, Any]) -> None:
    config = parse(*argv)
    for field, value in expected.items():
        assert getattr(config, field) == value, field


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse("--connection-file", "c.json", "--log-file", "k.log")
    assert config.connection_file == tmp_path / "c.json"
    assert config.log_file == tmp_path / "k.log"


def test_default_token_is_random_hex() -> None:
    a, b = parse().token, parse().token
    assert a is not None and re.fullmatch(r"[0-9a-f]{16}", a)
    assert a != b


@pytest.mark.parametrize(
    ("argv", "transport"),
    [
        ([], "tcp"),
        (["--transport", "tcp"], "tcp"),
        (["--transport", "socket"], "socket"),
        (["--unix-socket", "/tmp/a.sock"], "socket"),
        (["--connection-file", "/tmp/c.json"], "socket"),
        (["--handshake-socket", "/tmp/h.sock"], "socket"),
        (["--connection-file", "/tmp/c.json", "--transport", "tcp"], "tcp"),
        (["--handshake-socket", "/tmp/h.sock", "--transport", "tcp"], "tcp"),
        (["--connection-file", "/tmp/c.json", "--handshake-socket", "/tmp/h.sock"], "socket"),
        (["--unix-socket", "/tmp/a.sock", "--transport", "socket"], "socket"),
        (["--port", "0", "--transport", "socket"], "socket"),
    ],
)
def test_transport_inference(argv: list[str], transport: str) -> None:
    assert parse(*argv).transport == transport


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--transport", "named-pipe"], "only available on Windows"),
        (["--transport", "carrier-pigeon"], "invalid transport 'carrier-pigeon'"),
        (["--port", "8080", "--transport", "socket"], "--port can only be used with the tcp"),
        (["--port", "8080", "--connection-file", "/tmp/c.json"], "--port can only be used"),
        (["--port", "8080", "--unix-socket", "/tmp/a.sock"], "--port can only be used"),
        (["--unix-socket", "/tmp/a.sock", "--transport", "tcp"], "--unix-socket requires"),
        (["--unix-socket", "/tmp/" + "s" * 100], "the limit is 104"),
        (["--token", "/nonexistent/token"], "could not read the token file"),
    ],
)
def test_validation_errors_exit_1(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ")
    assert message in err


@pytest.mark.parametrize(
    "argv",
    [["--port", "70000"], ["--port", "x"], ["-i", "-1"], ["-r", "65536"], ["--bogus"],
     ["--busy-poll", "-1"], ["--busy-poll", "101"], ["--busy-poll", "nan"],
     ["--busy-poll", "2ms"], ["--resource-include-children", "yes"],
     ["--outbox-frames", "99"], ["--outbox-frames", "1e4"], ["--outbox-mib", "0"],
     ["--outbox-mib", "65537"]],
)
def test_argparse_errors_exit_nonzero(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code != 0


def test_token_file_read_trimmed_and_deleted(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret-token\n\n")
    assert parse("--token", str(token_file)).token == "s3cret-token"
    assert not token_file.exists()


def test_token_of_64_chars_is_accepted(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a" * 64)
    assert parse("-t", str(token_file)).token == "a" * 64


@pytest.mark.parametrize(
    ("content", "message"),
    [("a" * 65, "longer than 64"), ("   \n", "is empty"), ("two words", "printable ASCII")],
)
def test_bad_token_rejected_and_file_still_deleted(
    tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(content)
    assert cli.main(["--token", str(token_file)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err
    assert content.strip() not in err or not content.strip()  # the token is not echoed
    assert not token_file.exists()


def test_log_level_from_rust_log_and_invalid_values() -> None:
    assert parse(environ={"RUST_LOG": "debug"}).log_level == "debug"
    assert parse("-l", "error", environ={"RUST_LOG": "debug"}).log_level == "error"
    err = io.StringIO()
    ns = cli.build_parser().parse_args(["--log-level", "loud"])
    assert cli.config_from_args(ns, {}, err=err).log_level == "info"
    assert err.getvalue().strip() == "Invalid log level 'loud'; using 'info'"
    err = io.StringIO()
    ns = cli.build_parser().parse_args([])
    assert cli.config_from_args(ns, {"RUST_LOG": "kcserver=debug"}, err=err).log_level == "info"
    assert "Invalid log level 'kcserver=debug'" in err.getvalue()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"kcserver {KALLICHORE_VERSION} (kallichore-trio ")
    with pytest.raises(SystemExit):
        cli.main(["-V"])
    assert capsys.readouterr().out == out


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--port", "-p", "--token", "-t", "--idle-shutdown-hours", "-i",
                 "--resource-sample-interval", "-r", "--log-level", "-l", "--log-file",
                 "--connection-file", "--handshake-socket", "--socket-dir", "--unix-socket",
                 "--transport", "--busy-poll", "--resource-include-children", "--outbox-frames",
                 "--outbox-mib", "--version", "-V", "--help"]:
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", out), flag


def test_prepare_paths_creates_parents(short_dir: Path) -> None:
    config = parse("--unix-socket", str(short_dir / "a" / "b" / "api.sock"),
                   "--socket-dir", str(short_dir / "socks"))
    cli.prepare_paths(config)
    assert (short_dir / "a" / "b").is_dir()
    assert (short_dir / "socks").is_dir()


def test_log_format_levels_and_truncation(tmp_path: Path) -> None:
    log_file = tmp_path / "k.log"
    log_file.write_text("old contents\n")
    handlers = cli.setup_logging("trace", log_file)
    try:
        logger = logging.getLogger("kallichore_trio.test")
        logger.log(cli.TRACE, "a trace line")
        logger.warning("a warning")
        logger.info("an info line")
    finally:
        cli.teardown_logging(handlers)
    lines = log_file.read_text().splitlines()
    assert [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in lines] == [
        "[TRACE] a trace line",
        "[WARN] a warning",
        "[INFO] an info line",
    ]
    assert all(re.match(r"\d\d:\d\d:\d\d \[", line) for line in lines)


def test_unwritable_log_file_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--log-file", "/nonexistent/dir/k.log"]) == 1
    assert capsys.readouterr().err.startswith("Error: could not open the log file")


# -- announce / serve with a stand-in daemon --------------------------------------------------


@attrs.frozen
class FakeAddress:
    transport: str
    port: int | None = None
    base_path: str | None = None
    socket_path: str | None = None


TCP = FakeAddress("tcp", port=4321, base_path="http://127.0.0.1:4321")


def fake_daemon(address: FakeAddress, *, forever: bool = False) -> Any:
    state: dict[str, Any] = {}

    async def run_daemon(config: Config, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        state["config"] = config
        try:
            task_status.started(address)
            if forever:
                await trio.sleep_forever()
        finally:
            state["exited"] = True

    run_daemon.state = state  # type: ignore[attr-defined]
    return run_daemon


async def test_serve_tcp_prints_url_token_and_curl() -> None:
    config = Config(token="tok123")
    out = io.StringIO()
    assert await cli.serve(config, fake_daemon(TCP), out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "Listening at 127.0.0.1:4321"
    assert "http://127.0.0.1:4321" in lines[1]
    assert "tok123" in lines[2]
    assert lines[3] == (
        "Try: curl -H 'Authorization: Bearer tok123' http://127.0.0.1:4321/sessions"
    )
    assert sum("curl" in line for line in lines) == 1


async def test_serve_socket_curl_and_no_token() -> None:
    address = FakeAddress("socket", socket_path="/run/user/1/kc-1.sock")
    out = io.StringIO()
    assert await cli.serve(Config(transport="socket", token=None), fake_daemon(address), out) == 0
    text = out.getvalue()
    assert text.startswith("Listening on Unix socket: /run/user/1/kc-1.sock\n")
    assert "curl --unix-socket /run/user/1/kc-1.sock http://localhost/sessions" in text
    assert "Bearer" not in text


async def test_serve_connection_file_keeps_token_off_stdout(tmp_path: Path) -> None:
    conn = tmp_path / "c.json"
    config = Config(token="hidden-token", connection_file=conn)
    out = io.StringIO()
    assert await cli.serve(config, fake_daemon(TCP), out) == 0
    assert out.getvalue() == "Listening at 127.0.0.1:4321\n"
    doc = json.loads(conn.read_text())
    assert doc["bearer_token"] == "hidden-token"
    assert doc["port"] == 4321 and doc["server_id"] == config.server_id
    assert stat.S_IMODE(conn.stat().st_mode) == 0o600


async def test_serve_handshake(short_dir: Path) -> None:
    path = short_dir / "hs.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)
    received = bytearray()

    async def client_side() -> None:
        conn, _ = await listener.accept()
        with conn:
            while chunk := await conn.recv(65536):
                received.extend(chunk)

    config = Config(transport="socket", token="hs-token", handshake_socket=path)
    address = FakeAddress("socket", socket_path="/tmp/kc-1.sock")
    out = io.StringIO()
    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            assert await cli.serve(config, fake_daemon(address), out) == 0
    doc = json.loads(received)
    assert doc["socket_path"] == "/tmp/kc-1.sock" and doc["bearer_token"] == "hs-token"
    assert "hs-token" not in out.getvalue()


async def test_serve_handshake_failure_stops_daemon(short_dir: Path) -> None:
    config = Config(transport="socket", handshake_socket=short_dir / "nobody.sock")
    daemon = fake_daemon(FakeAddress("socket", socket_path="/tmp/x.sock"), forever=True)
    with trio.fail_after(5):
        assert await cli.serve(config, daemon, io.StringIO()) == 1
    assert daemon.state["exited"]


def test_main_end_to_end_with_fake_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("main-token")
    conn, log_file = tmp_path / "c.json", tmp_path / "k.log"
    daemon = fake_daemon(TCP)
    monkeypatch.setattr(cli, "_load_daemon", lambda: daemon)
    argv = ["--connection-file", str(conn), "--transport", "tcp", "--token", str(token_file),
            "--log-file", str(log_file), "--log-level", "debug", "-i", "1", "-r", "500"]
    assert cli.main(argv) == 0
    config: Config = daemon.state["config"]
    assert (config.transport, config.idle_shutdown_hours, config.resource_sample_interval_ms) == (
        "tcp", 1, 500)
    assert json.loads(conn.read_text())["log_path"] == str(log_file)
    captured = capsys.readouterr()
    assert "main-token" not in captured.out + captured.err
    assert "main-token" not in log_file.read_text()
    assert "[INFO]" in log_file.read_text()
    assert log_file.stat().st_mode & 0o777 == 0o600
    assert not token_file.exists()


def test_an_existing_log_file_is_made_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_file = tmp_path / "k.log"
    log_file.write_text("old run\n")
    log_file.chmod(0o644)
    monkeypatch.setattr(cli, "_load_daemon", lambda: fake_daemon(TCP))
    assert cli.main(["--token", "none", "--log-file", str(log_file)]) == 0
    assert log_file.stat().st_mode & 0o777 == 0o600
    assert "old run" not in log_file.read_text()


@pytest.mark.parametrize(("origins", "allowed"), [
    ([], frozenset()),
    (["--allow-origin", "http://localhost:3000"], frozenset({"http://localhost:3000"})),
    (["--allow-origin", "HTTP://LocalHost:3000", "--allow-origin", "vscode-webview://abc"],
     frozenset({"http://localhost:3000", "vscode-webview://abc"})),
])
def test_allow_origin(origins: list[str], allowed: frozenset[str]) -> None:
    assert parse(*origins).allowed_origins == allowed


@pytest.mark.parametrize("bad", ["null", "*", "localhost:3000", "http://", "http://x/",
                                 "http://x/path", "http://user@x", "1http://x"])
def test_allow_origin_rejects_what_is_not_an_origin(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse("--allow-origin", bad)
    assert "is not an origin" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "logged"), [
    (["--busy-poll", "3"], "polling for 3 ms after each relayed message"),
    (["--busy-poll", "0"], "no polling after relayed messages"),
])
def test_the_busy_poll_setting_is_logged_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: list[str], logged: str
) -> None:
    log_file = tmp_path / "k.log"
    daemon = fake_daemon(TCP)
    monkeypatch.setattr(cli, "_load_daemon", lambda: daemon)
    assert cli.main(["--token", "none", "--log-file", str(log_file), *flag]) == 0
    assert daemon.state["config"].busy_poll == float(flag[1]) / 1000
    assert logged in log_file.read_text()
