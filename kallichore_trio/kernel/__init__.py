"""One kernel incarnation and what it takes to launch one: no session import here.

`kernel.Kernel` runs a kernel process (or an adopted kernel) and its ZeroMQ sockets, and
reports what happens through the narrow `kernel.KernelEvents` protocol; `startup` brings it up
(handshake, kernel_info probe, startup failures); `launch` builds and spawns the command;
`connection` picks ports and writes connection files; `resources` samples a process tree.
"""
