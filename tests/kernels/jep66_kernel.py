"""A test kernel that registers through JEP 66 (Kallichore/Ark flavour), then answers
kernel_info_request and echoes heartbeats. Usage: jep66_kernel.py <registration file>.

It binds its own ports, sends a signed `handshake_request` with them to the registration REP
socket, waits for `handshake_reply`, and serves until it gets a shutdown_request.
"""

import json
import sys

import zmq
from kernel_wire import KernelWire

registration = json.load(open(sys.argv[1]))
key = registration["key"].encode()
ctx = zmq.Context()


wire = KernelWire(key, session="jep66", version="5.5")
message = wire.message


sockets = {}
for name, kind in (("shell", zmq.ROUTER), ("control", zmq.ROUTER), ("stdin", zmq.ROUTER),
                   ("iopub", zmq.PUB), ("hb", zmq.REP)):
    sock = ctx.socket(kind)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sockets[name] = (sock, port)

req = ctx.socket(zmq.REQ)
req.connect(f"tcp://127.0.0.1:{registration['registration_port']}")
ports = {f"{n}_port": p for n, (_, p) in sockets.items()}
req.send_multipart(message("handshake_request", ports))
if not req.poll(10_000):
    sys.exit("no handshake_reply")
reply = req.recv_multipart()
content = json.loads(reply[reply.index(b"<IDS|MSG>") + 5])
assert content["status"] == "ok", content
req.close()
print("handshake done", flush=True)

poller = zmq.Poller()
for sock, _ in sockets.values():
    poller.register(sock, zmq.POLLIN)
iopub = sockets["iopub"][0]
while True:
    for sock, _ in poller.poll():
        frames = sock.recv_multipart()
        if sock is sockets["hb"][0]:
            sock.send_multipart(frames)
            continue
        delim = frames.index(b"<IDS|MSG>")
        idents, header = frames[:delim], json.loads(frames[delim + 2])
        parent = header
        iopub.send_multipart(message("status", {"execution_state": "busy"}, parent))
        if header["msg_type"] == "kernel_info_request":
            info = {"status": "ok", "protocol_version": "5.5", "implementation": "jep66",
                    "implementation_version": "1", "banner": "",
                    "language_info": {"name": "test", "version": "1"}}
            sock.send_multipart(idents + message("kernel_info_reply", info, parent))
        elif header["msg_type"] == "shutdown_request":
            sock.send_multipart(idents + message("shutdown_reply", {"status": "ok"}, parent))
            iopub.send_multipart(message("status", {"execution_state": "idle"}, parent))
            sys.exit(0)
        iopub.send_multipart(message("status", {"execution_state": "idle"}, parent))
