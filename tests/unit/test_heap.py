"""replication_agent.heap: large buffers stay in the heap (glibc's mallopt)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_keep_large_buffers_sets_the_thresholds_here() -> None:
    # in a child: the thresholds are process-wide and stay set
    code = textwrap.dedent("""
        from replication_agent.heap import keep_large_buffers
        assert keep_large_buffers() is True
        assert keep_large_buffers() is True  # idempotent
        buffers = [bytes(1 << 20) for _ in range(64)]  # still allocates as before
        assert sum(map(len, buffers)) == 64 << 20
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
