"""`kc attach ID`: an interactive console on a session, with prompt_toolkit.

Attaching takes the session's channel (one client per session: Positron, if attached, is told
another client connected). Ctrl-C while code runs interrupts the kernel; Ctrl-C at the prompt
clears the line; Ctrl-D detaches and leaves the kernel running. Code the kernel reports as
incomplete (`is_complete_request`) continues on the next line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from kallichore_trio.client.errors import ClientError, KernelDied

if TYPE_CHECKING:
    from kallichore_trio.client.kc_output import Output
    from kallichore_trio.client.sync import Client


def attach(client: Client, session_id: str, io: Output) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    from kallichore_trio.client.kc_output import Printer, print_notices, run_interruptibly

    info = client.session_info(session_id)
    session = client.session(session_id)
    session.on_notice = print_notices(io, session_id)
    session.attach(force=True)
    io.out.write(f"Attached to {session_id} ({info.display_name}, {info.status}). Ctrl-C "
                 "interrupts the kernel, Ctrl-D detaches (the kernel keeps running).\n")
    io.out.flush()
    prompts: PromptSession[str] = PromptSession(history=InMemoryHistory())
    printer = Printer(io, session_id, Path("."), prompt_results=True)
    count = info.kernel_info.get("execution_count") if info.kernel_info else None
    number = (count + 1) if isinstance(count, int) else 1
    while True:
        try:
            code = prompts.prompt(f"In [{number}]: ")
            while code.strip() and _incomplete(session, code):
                code += "\n" + prompts.prompt("   ...: ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
        if not code.strip():
            continue

        async def job(code: str = code) -> object:
            return await session.asession.execute(code, on_message=printer,
                                                  timeout=math.inf)

        try:
            box = run_interruptibly(client, session, job)
        except KernelDied as exc:
            io.err.write(f"kc: {exc}\n")
            return 1
        except ClientError as exc:
            io.err.write(f"kc: {exc}\n")
            continue
        number = box["value"].execution_count + 1
    session.close()
    io.out.write(f"Detached from {session_id}; the kernel keeps running.\n")
    return 0


def _incomplete(session: object, code: str) -> bool:
    try:
        reply = session.is_complete(code)  # type: ignore[attr-defined]
    except ClientError:
        return False
    return reply.get("status") == "incomplete"
