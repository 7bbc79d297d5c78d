"""Sockets, below the session: ZeroMQ for Trio (zmq_trio), the channels WebSocket (websocket),
Unix listeners and socket paths (unix), Hypercorn's WebSocket handover (hypercorn_ext).

Nothing here knows sessions, kernels, the API or the daemon (tests/unit/test_imports.py).
"""
