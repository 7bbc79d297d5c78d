"""Run by kernels in the startup_environment scenario (docs/protocol.md §6.3).

Usage: startup_probe.py test_<name> <direct|shell>. Prints banners, the markers the test looks
for, and what it can see of how the kernel was started.
"""

import os
import sys

name, mode = sys.argv[1], sys.argv[2]
print(f"=== START {name} ===")
print(f"Test marker: {name}")
print(f"Expected mode: {mode}")
print(f"SHELL={os.environ.get('SHELL', '')}")
print(f"TEST_VAR={os.environ.get('TEST_VAR', '')}")
print(f"=== END {name} ===")
