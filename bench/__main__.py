"""The benchmark driver: ``bench/run [--quick] [NAME...]`` (or ``python -m bench``).

Runs the benchmarks one after another (never two at once), each in its own process (its own
test network, and a crash or hang cannot take the driver down), collects their results into
``build/bench/summary.json`` with the machine's description, and prints a Markdown table.
Exits non-zero only when a benchmark could not run (crashed or timed out), never because a
goal was missed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from bench.common import OUT_DIR, REPO, fmt, machine_info

#: name -> (module, number in the issue)
BENCHMARKS: dict[str, tuple[str, int]] = {
    "sync": ("agent_sync", 1),
    "sync-files": ("agent_sync_files", 1),
    "async": ("agent_async", 2),
    "delta": ("agent_delta", 3),
    "delta-ext4": ("agent_delta_ext4", 3),
    "rebuild": ("agent_rebuild", 4),
    "qos": ("agent_qos", 5),
    "operator": ("operator_scale", 6),
    "cluster": ("cluster_pod", 7),
}
#: Module names, and issue numbers (a number names the first benchmark that has it).
ALIASES = {**{str(i): n for n, (_, i) in reversed(BENCHMARKS.items())},
           **{m: n for n, (m, _) in BENCHMARKS.items()}}


def resolve(names: list[str]) -> list[str]:
    if not names:
        return list(BENCHMARKS)
    out = []
    for raw in names:
        name = raw if raw in BENCHMARKS else ALIASES.get(raw)
        if name is None:
            raise SystemExit(f"bench/run: unknown benchmark {raw!r}; choose from "
                             f"{', '.join(BENCHMARKS)}")
        if name not in out:
            out.append(name)
    return out


def run_one(name: str, quick: bool, timeout: float) -> dict[str, Any]:
    module, number = BENCHMARKS[name]
    out = OUT_DIR / f"{name}.json"
    log_path = OUT_DIR / f"{name}.log"
    out.unlink(missing_ok=True)
    argv = [sys.executable, "-m", f"bench.{module}", "--out", str(out)]
    if quick:
        argv.append("--quick")
    started = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log_file.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)  # lets the benchmark clean up
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        reader.join(10)
    elapsed = time.monotonic() - started
    try:
        result: dict[str, Any] = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        result = {"name": name, "title": module, "status": "crashed", "figures": [],
                  "reason": f"no result ({type(exc).__name__}); exit code {proc.returncode}; "
                            f"see {log_path}"}
    if timed_out:
        result["status"] = "crashed"
        result["reason"] = f"timed out after {timeout:.0f} s; " + result.get("reason", "")
    elif proc.returncode != 0 and result.get("status") == "ok":
        result["status"] = "crashed"
        result["reason"] = f"exit code {proc.returncode}"
    result["number"] = number
    result["wall_seconds"] = round(elapsed, 1)
    result["log"] = str(log_path.relative_to(REPO))
    return result


def code_state() -> dict[str, Any]:
    """The commit measured, and the files that differed from it (colleagues edit live)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=30, check=False).stdout
        except OSError:
            return ""
    modified = [line[3:] for line in git("status", "--porcelain").splitlines()
                if len(line) > 3 and not line[3:].startswith(("bench/", "build/"))]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "modified": modified}


def markdown(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        f"sharedsync benchmarks ({summary['mode']}), {summary['started']}, "
        f"{summary['total_seconds']:.0f} s",
        "",
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"kernel {m['kernel']}, load at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
        f"code: {summary['code']['commit']}"
        + (f" + uncommitted changes in {', '.join(summary['code']['modified'])}"
           if summary["code"]["modified"] else ""),
        "",
        "| # | benchmark | figure | value | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in summary["benchmarks"]:
        label = f"{b['name']}"
        if b["status"] != "ok":
            reason = str(b.get("reason", "")).replace("|", "/").splitlines()[0][:200] \
                if b.get("reason") else ""
            lines.append(f"| {b['number']} | {label} | {b['status']}: {reason} | | | | | |")
            continue
        for f in b["figures"]:
            baseline = (f"{fmt(f['baseline_value'])} ({f['baseline']})"
                        if f["baseline"] else "")
            met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
            ratio = f"{fmt(f['ratio'])}x" if f["ratio"] is not None else ""
            lines.append(f"| {b['number']} | {label} | {f['name']} | {fmt(f['value'])} "
                         f"{f['unit']} | {baseline} | {ratio} | {f['goal']} | {met} |")
    def waited(b: dict[str, Any]) -> float:
        d = b.get("details", {})
        return float(d.get("netns_lock_wait_seconds", 0) + d.get("bench_lock_wait_seconds", 0))

    waits = [f"{b['name']} {waited(b):.0f} s" for b in summary["benchmarks"] if waited(b) > 1]
    lines.append("")
    lines.append("wall time per benchmark: " + ", ".join(
        f"{b['name']} {b['wall_seconds']:.0f} s" for b in summary["benchmarks"]))
    if waits:
        lines.append("of which waiting for the host locks (test network, other benchmark runs): "
                     + ", ".join(waits))
    for b in summary["benchmarks"]:
        for w in b.get("warnings", []):
            lines.append(f"warning ({b['name']}): {w}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/run", description="Run the sharedsync benchmarks (figures, not tests).")
    parser.add_argument("names", nargs="*", help=f"subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="smaller data, < 3 min in all")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per benchmark (default 600 quick, 1800 full)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run: needs root (loop devices, mounts, network namespaces)",
              file=sys.stderr)
        return 2
    names = resolve(args.names)
    timeout = args.timeout or (600.0 if args.quick else 1800.0)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    summary: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": code_state(),
        "benchmarks": [],
    }
    for name in names:
        summary["benchmarks"].append(run_one(name, args.quick, timeout))
    summary["total_seconds"] = round(time.monotonic() - started, 1)
    (OUT_DIR / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    table = markdown(summary)
    (OUT_DIR / "summary.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nwritten: {OUT_DIR / 'summary.json'}")
    return 1 if any(b["status"] == "crashed" for b in summary["benchmarks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
