"""A minimal Jupyter kernel that floods iopub, so the supervisor, not the kernel, is the bottleneck.

Usage: python flood_kernel.py -f CONNECTION_FILE

Speaks the Jupyter wire protocol (5.3) with pyzmq only: shell/control/stdin ROUTER, iopub PUB
(SNDHWM 0: nothing is dropped), hb REP echo. It answers kernel_info_request and
shutdown_request; on an execute_request whose code is ``flood N`` it publishes busy, N stream
messages (stdout, text "line i\\n"), the execute_reply, then idle. Other code just replies ok.
Other ``*_request`` messages get an ``ok`` reply of the matching type.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import signal
import sys
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import zmq

DELIM = b"<IDS|MSG>"
SESSION = uuid.uuid4().hex
KERNEL_INFO = {
    "status": "ok",
    "protocol_version": "5.3",
    "implementation": "flood_kernel",
    "implementation_version": "1.0",
    "language_info": {
        "name": "python",
        "version": sys.version.split()[0],
        "mimetype": "text/x-python",
        "file_extension": ".py",
    },
    "banner": "flood kernel (benchmark relay load)",
    "help_links": [],
}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Kernel:
    def __init__(self, conn: dict[str, Any]) -> None:
        key = conn.get("key", "").encode()
        self.mac = hmac.new(key, digestmod=hashlib.sha256) if key else None
        self.ctx = zmq.Context()
        url = f"{conn['transport']}://{conn['ip']}"
        sep = ":" if conn["transport"] == "tcp" else "-"

        def bind(kind: int, name: str) -> zmq.Socket:
            sock = self.ctx.socket(kind)
            sock.linger = 1000
            if kind == zmq.PUB:
                sock.sndhwm = 0
            sock.bind(f"{url}{sep}{conn[name + '_port']}")
            return sock

        self.shell = bind(zmq.ROUTER, "shell")
        self.control = bind(zmq.ROUTER, "control")
        self.stdin = bind(zmq.ROUTER, "stdin")
        self.iopub = bind(zmq.PUB, "iopub")
        self.hb = bind(zmq.REP, "hb")
        self.counter = 0
        self.execution_count = 0
        self.stopping = threading.Event()

    def sign(self, *parts: bytes) -> bytes:
        if self.mac is None:
            return b""
        h = self.mac.copy()
        for part in parts:
            h.update(part)
        return h.hexdigest().encode()

    def header(self, msg_type: str) -> bytes:
        self.counter += 1
        return (
            f'{{"msg_id":"{SESSION}_{self.counter}","msg_type":"{msg_type}",'
            f'"session":"{SESSION}","username":"kernel","date":"{_now()}","version":"5.3"}}'
        ).encode()

    def send(
        self, sock: zmq.Socket, idents: list[bytes], msg_type: str, parent: bytes, content: Any
    ) -> None:
        hdr = self.header(msg_type)
        body = json.dumps(content).encode()
        sig = self.sign(hdr, parent, b"{}", body)
        sock.send_multipart([*idents, DELIM, sig, hdr, parent, b"{}", body])

    def status(self, state: str, parent: bytes) -> None:
        self.send(self.iopub, [b"status"], "status", parent, {"execution_state": state})

    def flood(self, n: int, parent: bytes) -> None:
        """Publish n stream messages as fast as possible (pre-built, pre-keyed HMAC)."""
        prefix = f'{{"msg_id":"{SESSION}_f'
        date = _now()
        suffix = f'","msg_type":"stream","session":"{SESSION}","username":"kernel","date":"'
        send = self.iopub.send_multipart
        for i in range(n):
            if i % 1000 == 0:
                date = _now()
            hdr = f'{prefix}{self.counter}_{i}{suffix}{date}","version":"5.3"}}'.encode()
            body = b'{"name":"stdout","text":"line %d\\n"}' % i
            send([b"stream", DELIM, self.sign(hdr, parent, b"{}", body), hdr, parent, b"{}", body])
        self.counter += 1

    def handle(self, sock: zmq.Socket, frames: list[bytes]) -> bool:
        """Handle one request; False means: shut down."""
        try:
            i = frames.index(DELIM)
        except ValueError:
            return True
        idents = frames[:i]
        sig, hdr, parent_raw, meta, content_raw = frames[i + 1 : i + 6]
        if self.mac is not None and not hmac.compare_digest(
            sig, self.sign(hdr, parent_raw, meta, content_raw)
        ):
            return True
        msg_type = json.loads(hdr)["msg_type"]
        content = json.loads(content_raw)
        self.status("busy", hdr)
        keep_going = True
        if msg_type == "kernel_info_request":
            self.send(sock, idents, "kernel_info_reply", hdr, KERNEL_INFO)
        elif msg_type == "execute_request":
            self.execution_count += 1
            code = str(content.get("code", "")).strip()
            parts = code.split()
            if len(parts) == 2 and parts[0] == "flood" and parts[1].isdigit():
                self.flood(int(parts[1]), hdr)
            reply = {"status": "ok", "execution_count": self.execution_count}
            self.send(sock, idents, "execute_reply", hdr, {**reply, "user_expressions": {}})
        elif msg_type == "shutdown_request":
            restart = bool(content.get("restart", False))
            self.send(sock, idents, "shutdown_reply", hdr, {"status": "ok", "restart": restart})
            keep_going = False
        elif msg_type.endswith("_request"):
            self.send(sock, idents, msg_type[: -len("_request")] + "_reply", hdr, {"status": "ok"})
        self.status("idle", hdr)
        return keep_going

    def heartbeat(self) -> None:
        while not self.stopping.is_set():
            if self.hb.poll(100):
                self.hb.send(self.hb.recv())

    def run(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nothing to interrupt: floods are short
        hb_thread = threading.Thread(target=self.heartbeat, daemon=True)
        hb_thread.start()
        self.status("starting", b"{}")
        poller = zmq.Poller()
        for sock in (self.control, self.shell, self.stdin):
            poller.register(sock, zmq.POLLIN)
        running = True
        while running:
            for sock, _ in poller.poll():
                if not self.handle(sock, sock.recv_multipart()):
                    running = False
                    break
        self.stopping.set()
        hb_thread.join(timeout=2)
        for sock in (self.shell, self.control, self.stdin, self.iopub, self.hb):
            sock.close(linger=1000)
        self.ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", dest="connection_file", required=True)
    args = parser.parse_args()
    with open(args.connection_file) as f:
        conn = json.load(f)
    Kernel(conn).run()


if __name__ == "__main__":
    main()
