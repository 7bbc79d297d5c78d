"""The MCP server of Kallichore 0.1.69: coding agents in the user's sessions (docs/mcp.md).

workspaces.py, frames.py and tools.py are pure; windows.py brokers Positron commands to the
windows; calls.py runs the tools; server.py and listener.py put them on the SDK's Streamable
HTTP transport on a loopback port; service.py ties them together for the daemon; stdio.py is
`kcserver mcp-stdio`.
"""
