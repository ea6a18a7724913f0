"""The operator's memory goal (<= 150 MiB, bench/operator_scale.py) leaves no room for
libraries it does not use: the certificate toolkit and the agent's config models cost about
16 MiB at import. This guards the import graph that keeps them out."""

import subprocess
import sys

HEAVY = ("cryptography", "pydantic")


def test_the_operator_loads_neither_the_certificate_toolkit_nor_the_agent_config() -> None:
    probe = ("import sys, sharedsync_operator.cli\n"
             f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, timeout=120).stdout.split()
    assert loaded == []
