"""ipykernel that finds one of its ports taken, on its first N launches: the port race, on demand.

Usage: port_squatter.py COUNTER_FILE N CONNECTION_FILE [exit]. Each launch adds one to
COUNTER_FILE.
While the count is at most N, this process binds the connection file's iopub port itself
before ipykernel starts, so ipykernel's own bind fails with EADDRINUSE exactly as when another
program takes the port between the supervisor's pick and the kernel's bind. (ipykernel then
prints the ZMQError and hangs, kept alive by its threads.) Later launches run ipykernel as is.
With `exit`, a squatted launch behaves like kernels that print the error and exit instead.
"""

import json
import socket
import sys
from pathlib import Path

counter, squat_times, connection_file = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
launch = int(counter.read_text() or 0) + 1 if counter.exists() else 1
counter.write_text(str(launch))
print(f"port squatter: launch {launch}", flush=True)

if launch <= squat_times:
    port = json.loads(Path(connection_file).read_text())["iopub_port"]
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    if sys.argv[4:] == ["exit"]:
        print("bind: [Errno 98] Address already in use", file=sys.stderr, flush=True)
        sys.exit(1)

from ipykernel import kernelapp  # noqa: E402

sys.argv = [sys.argv[0], "-f", connection_file]
kernelapp.launch_new_instance()
