"""The MCP server of Kallichore 0.1.69: coding agents in the user's sessions (docs/mcp.md).

workspaces.py, frames.py and tools.py are pure; windows.py brokers Positron commands to the
windows; calls.py runs the tools; server.py and listener.py put them on the SDK's Streamable
HTTP transport on a loopback port, whose address and URLs are address.py's; service.py ties them
together for the daemon, and imports calls.py, server.py and listener.py (and so the SDK) only
at the first registration; stdio.py is `kcserver mcp-stdio`.
"""
