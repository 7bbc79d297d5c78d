"""Sessions from Jupyter kernelspecs, so nobody writes a kernel's argv by hand.

Kernelspecs are found with jupyter_client's `KernelSpecManager` (JUPYTER_PATH, the venv's and
the user's data dirs). A spec whose argv starts with a bare `python` / `python3` / `python3.X`
(ipykernel's own spec does) gets this interpreter instead, as jupyter_client does when it
launches kernels: the daemon's PATH may find another Python, without ipykernel.
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import Any

from kallichore_trio.client.errors import ClientError
from kallichore_trio.models import NewSession, VarAction


class KernelSpecNotFound(ClientError):
    """No kernelspec by that name."""


_PYTHON_NAMES = {"python", f"python{sys.version_info[0]}",
                 f"python{sys.version_info[0]}.{sys.version_info[1]}"}


def python_kernel_argv() -> list[str]:
    """This interpreter's ipykernel."""
    return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def kernelspecs() -> dict[str, dict[str, Any]]:
    """Every kernelspec: name -> {resource_dir, spec: {argv, display_name, language, ...}}."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KernelSpecManager().get_all_specs()


def resolve_argv(argv: list[str]) -> list[str]:
    if argv and argv[0] in _PYTHON_NAMES:
        return [sys.executable, *argv[1:]]
    return list(argv)


def new_session(
    session_id: str,
    *,
    kernelspec: str | None = None,
    argv: list[str] | None = None,
    display_name: str | None = None,
    language: str | None = None,
    working_directory: str | None = None,
    env: dict[str, str] | None = None,
    interrupt_mode: str | None = None,
    connection_timeout: int | None = None,
    session_mode: str = "console",
) -> NewSession:
    """The `newSession` body for a kernelspec by name, or for an explicit argv (default: this
    interpreter's ipykernel). `env` is added to the kernel's environment (replacing values)."""
    spec_env: dict[str, str] = {}
    if kernelspec is not None:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        try:
            spec = KernelSpecManager().get_kernel_spec(kernelspec)
        except NoSuchKernel:
            names = ", ".join(sorted(kernelspecs())) or "none"
            raise KernelSpecNotFound(
                f"no kernelspec named {kernelspec!r} (found: {names}); `jupyter kernelspec "
                "list` shows where they are looked for") from None
        argv = resolve_argv(spec.argv) if argv is None else argv
        display_name = display_name or spec.display_name
        language = language or spec.language
        interrupt_mode = interrupt_mode or spec.interrupt_mode
        spec_env = dict(spec.env or {})
    if argv is None:
        argv = python_kernel_argv()
    merged = {**spec_env, **(env or {})}
    return NewSession(
        session_id=session_id,
        display_name=display_name or "Python (ipykernel)",
        language=language or "python",
        username=getpass.getuser(),
        input_prompt="",
        continuation_prompt="",
        argv=list(argv),
        working_directory=working_directory or os.getcwd(),
        env=[VarAction("replace", k, v) for k, v in merged.items()],
        interrupt_mode="message" if interrupt_mode == "message" else "signal",
        session_mode=session_mode,  # type: ignore[arg-type]
        startup_environment="none",
        connection_timeout=connection_timeout,
    )
