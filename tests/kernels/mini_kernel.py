"""A minimal Jupyter kernel (pyzmq + hmac, no ipykernel) with misbehaviours chosen by argv.

Usage: mini_kernel.py <connection file> <mode>

Modes:
  normal        answers kernel_info/execute/shutdown with busy/idle on iopub; echoes heartbeats
  exit_at_once  prints a line to stderr and exits with code 3 before binding anything
  never_answers binds nothing and sleeps
  ignore_term   like normal, but ignores SIGTERM (says so on stderr) and shutdown_request
  spawn_child   like normal, but first starts a child process and prints `child pid <n>`
  hb_pause      like normal; an execute_request whose code is a number stops heartbeat echoes
                for that many seconds (after the reply and idle)
  late_stdin    like normal, but binds its stdin port only 0.5 s after its first kernel_info
                reply, or at its first execute_request if that comes first; an execute_request
                then asks for input at once (input_request on stdin, as ipykernel's input()
                does) and prints the answer. A client that has not connected to stdin by then
                never sees the prompt.
  flood         like normal; an execute_request publishes numbered iopub `stream` messages
                (stdout, text "<index>\n") as fast as it can, then its reply and idle. The
                code is a number N (the next N indices) or JSON
                {"first": A, "count": N, "status_every": K}: indices from A up to A+N-1,
                with a `status` busy message after every K-th one when K is given (a frame
                the daemon's outbox keeps while it sheds stream output around it). An index
                is never published twice: the kernel remembers the next one, and a request
                for indices it already published publishes only the rest (so a client that
                is unsure whether its request arrived may send it again). The iopub socket
                has no high-water mark: whatever the daemon does not read in time waits in
                libzmq, never dropped by the kernel.
  flood_stdout  like normal; an execute_request whose code is a number N writes N lines of
                60,000 bytes to the process's own stdout (not iopub), before its reply: line
                i is `i` and then x's

Every mode first prints `mini kernel pid <n>` on stdout.
"""

import json
import os
import signal
import subprocess
import sys
import time

mode = sys.argv[2] if len(sys.argv) > 2 else "normal"
print(f"mini kernel pid {os.getpid()}", flush=True)

if mode == "exit_at_once":
    print("mini kernel: failing on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "never_answers":
    while True:
        time.sleep(3600)

import zmq  # noqa: E402
from kernel_wire import KernelWire  # noqa: E402

info = json.load(open(sys.argv[1]))
key = info["key"].encode()
ctx = zmq.Context()


def on_term(signum, frame):
    print("mini kernel: ignored SIGTERM", file=sys.stderr, flush=True)


if mode == "ignore_term":
    signal.signal(signal.SIGTERM, on_term)
if mode == "spawn_child":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    print(f"child pid {child.pid}", flush=True)


wire = KernelWire(key, session="mini", version="5.3")
message = wire.message


url = f"{info['transport']}://{info['ip']}:"
sockets = {}
for name, kind in (("shell", zmq.ROUTER), ("control", zmq.ROUTER), ("stdin", zmq.ROUTER),
                   ("iopub", zmq.PUB), ("hb", zmq.ROUTER)):
    sock = ctx.socket(kind)
    if mode == "flood" and kind == zmq.PUB:
        sock.sndhwm = 0
    if not (mode == "late_stdin" and name == "stdin"):
        sock.bind(url + str(info[f"{name}_port"]))
    sockets[name] = sock
iopub, hb, stdin = sockets["iopub"], sockets["hb"], sockets["stdin"]

poller = zmq.Poller()
for sock in sockets.values():
    if sock is not stdin or mode != "late_stdin":
        poller.register(sock, zmq.POLLIN)
hb_paused_until = 0.0
execution_count = 0
stdin_bound = mode != "late_stdin"
bind_stdin_at = 0.0


def bind_stdin():
    global stdin_bound
    if not stdin_bound:
        stdin.bind(url + str(info["stdin_port"]))
        stdin_bound = True


flood_next = 0  # the next index the flood mode publishes


def flood(code, parent):
    """Publish the stream messages an execute_request asks for (see `flood` above)."""
    global flood_next
    spec = json.loads(code) if code.strip() else 0
    if isinstance(spec, int):
        spec = {"first": flood_next, "count": spec}
    end = spec["first"] + spec["count"]
    status_every = spec.get("status_every") or 0
    flood_next = max(flood_next, spec["first"])
    while flood_next < end:
        iopub.send_multipart(message("stream", {"name": "stdout", "text": f"{flood_next}\n"},
                                     parent))
        flood_next += 1
        if status_every and flood_next % status_every == 0:
            iopub.send_multipart(message("status", {"execution_state": "busy"}, parent))


def ask_for_input(idents, parent):
    """input_request on stdin to the shell request's routing prefix; the answer, or None."""
    stdin.send_multipart(idents + message("input_request", {"prompt": "? ", "password": False},
                                          parent))
    if not stdin.poll(10_000):
        return None
    answer = stdin.recv_multipart()
    return json.loads(answer[answer.index(b"<IDS|MSG>") + 5]).get("value")


while True:
    if bind_stdin_at and time.monotonic() >= bind_stdin_at:
        bind_stdin()
        bind_stdin_at = 0.0
    if hb_paused_until and time.monotonic() >= hb_paused_until:
        hb_paused_until = 0.0
        poller.register(hb, zmq.POLLIN)
    for sock, _ in poller.poll(100):
        frames = sock.recv_multipart()
        if sock is hb:
            sock.send_multipart(frames)
            continue
        delim = frames.index(b"<IDS|MSG>")
        idents, header = frames[:delim], json.loads(frames[delim + 2])
        content = json.loads(frames[delim + 5])
        parent = header
        msg_type = header["msg_type"]
        iopub.send_multipart(message("status", {"execution_state": "busy"}, parent))
        pause = 0.0
        if msg_type == "kernel_info_request":
            reply = {"status": "ok", "protocol_version": "5.3", "implementation": "mini",
                     "implementation_version": "1", "banner": "",
                     "language_info": {"name": "mini", "version": "1"}}
            sock.send_multipart(idents + message("kernel_info_reply", reply, parent))
            if not stdin_bound and not bind_stdin_at:
                bind_stdin_at = time.monotonic() + 0.5
        elif msg_type == "execute_request":
            execution_count += 1
            if mode == "hb_pause":
                pause = float(content.get("code") or 0)
            if mode == "flood":
                flood(content.get("code") or "", parent)
            if mode == "flood_stdout":
                for i in range(int(content.get("code") or 0)):
                    line = f"{i} ".encode()
                    os.write(1, line + b"x" * (60_000 - len(line) - 1) + b"\n")
            if mode == "late_stdin":
                bind_stdin()
                value = ask_for_input(idents, parent)
                iopub.send_multipart(message("stream", {"name": "stdout",
                                                        "text": f"got {value}\n"}, parent))
            reply = {"status": "ok", "execution_count": execution_count,
                     "user_expressions": {}}
            sock.send_multipart(idents + message("execute_reply", reply, parent))
        elif msg_type == "shutdown_request":
            sock.send_multipart(idents + message("shutdown_reply", {"status": "ok"}, parent))
            if mode != "ignore_term":
                iopub.send_multipart(message("status", {"execution_state": "idle"}, parent))
                sys.exit(0)
        iopub.send_multipart(message("status", {"execution_state": "idle"}, parent))
        if pause:
            hb_paused_until = time.monotonic() + pause
            poller.unregister(hb)
