"""bench.common.main: the command line every benchmark module shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.common import Result, main


def test_a_workdir_holding_an_earlier_run_is_refused(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cluster").mkdir()  # what an earlier run leaves: its agents' replicas
    ran: list[Path] = []

    def body(quick: bool, workdir: Path, result: Result) -> None:
        ran.append(workdir)

    with pytest.raises(SystemExit) as stopped:
        main("probe", "a probe", body, ["--workdir", str(tmp_path),
                                        "--out", str(tmp_path / "out.json")])
    assert stopped.value.code == 2
    assert ran == []
    assert "is not empty" in capsys.readouterr().err


def test_a_new_workdir_is_used(tmp_path: Path) -> None:
    ran: list[Path] = []

    def body(quick: bool, workdir: Path, result: Result) -> None:
        ran.append(workdir)

    out = tmp_path / "out.json"
    assert main("probe", "a probe", body, ["--quick", "--workdir", str(tmp_path / "new"),
                                           "--out", str(out)]) == 0
    assert ran == [tmp_path / "new"]
    assert out.exists()
