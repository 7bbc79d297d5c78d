"""The pytest plugin, run the way a user runs it: pytester writes a test suite that uses the
fixtures and runs pytest on it in a subprocess (the plugin is enabled by its entry point)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SUITE = '''
import pytest

def test_passes(kernel_session):
    result = kernel_session.execute("print(6 * 7)")
    assert result.stdout == "42\\n"

def test_fails_and_shows_the_kernel_output(kernel_session):
    result = kernel_session.execute(
        "import sys\\nprint('visible-stdout')\\nprint('visible-stderr', file=sys.stderr)")
    assert result.stdout == "something else"

def test_leaves_a_kernel_running(kc_client):
    kc_client.start_kernel(session_id="left-behind")

@pytest.mark.trio
async def test_on_trio(async_kernel_session):
    result = await async_kernel_session.execute("1 + 1")
    assert result.result == {"text/plain": "2"}
'''


def run_suite(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_generated=source)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error",
                                         "--kc-timeout-scale", "2", *args, timeout=300)


def test_a_generated_suite_runs_kernels_and_reports_failures(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, SUITE)
    result.assert_outcomes(passed=3, failed=1)
    text = result.stdout.str()
    # The failing test's report shows the kernel's side of the story.
    assert "kallichore session" in text
    assert "visible-stdout" in text and "visible-stderr" in text
    assert "--- last messages ---" in text
    # The kernel left running was reported and removed.
    assert "kernels left running by tests (cleaned up)" in text
    assert "left-behind" in text


def test_the_kernel_marker_selects_a_kernelspec(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, '''
import pytest

@pytest.mark.kernel("no-such-kernelspec")
def test_marked(kernel_session):
    pass
''')
    result.assert_outcomes(errors=1)
    assert "no kernelspec named 'no-such-kernelspec'" in result.stdout.str()


def test_the_plugin_is_inert_without_its_fixtures(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, """
import psutil

def test_plain():
    # Loaded (see the plugins line) but started nothing: no kcserver child process.
    assert psutil.Process().children(recursive=True) == []
""")
    result.assert_outcomes(passed=1)
    text = result.stdout.str()
    assert "kallichore-trio" in text  # the plugins line: enabled by its entry point
    assert "kallichore:" not in text


def test_the_worked_example_of_docs_client_md_passes(pytester: pytest.Pytester) -> None:
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "client.md").read_text()
    section = doc[doc.index("### A worked example"):]
    start = section.index("```python\n") + len("```python\n")
    example = section[start:section.index("\n```", start)]
    result = run_suite(pytester, example)
    result.assert_outcomes(passed=6)
