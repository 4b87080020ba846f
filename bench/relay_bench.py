"""Relay benchmark: mailwarden versus a Postfix relay, same box, same messages, one run.

Each system accepts N messages of SIZE bytes from Postfix's ``smtp-source`` over S
concurrent sessions and relays them to ``smtp-sink``. Printed per system (median of
``--runs``): messages/second accepted (N / smtp-source time), end to end (N / time until the
sink holds all N), p50/p99 transaction latency of a probe client running during the load,
peak RSS of the process tree, the tree's CPU per message over the measured window (user +
system, reaped children included), and the ratio mailwarden/Postfix.

    .venv/bin/python bench/relay_bench.py [--messages 20000] [--sessions 100] [--runs 3]

Both systems keep their durability contract: mailwarden fsyncs every message before 250,
Postfix does too (its default). Results go to stdout and ``bench/results/relay-*.json``.
Security: loopback only; bounded loops; child processes run from argument lists.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import (
    LatencyProbe,
    RssSampler,
    Sink,
    cpu_seconds,
    free_port,
    mailwarden_config,
    percentile,
    run_source,
    wait_port,
)
from tests.support.procs import stop_group

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    system: str
    accepted_per_s: float
    end_to_end_per_s: float
    p50_ms: float
    p99_ms: float
    peak_rss_mib: float
    probe_samples: int
    cpu_ms_per_msg: float = 0.0


def _measure(
    system: str,
    port: int,
    root_pid: int,
    sink: Sink,
    n: int,
    sessions: int,
    size: int,
    deadline: float,
) -> Result:
    rss = RssSampler(root_pid)
    probe = LatencyProbe(port)
    cpu0 = cpu_seconds(root_pid)
    t0 = time.monotonic()
    probe.start()
    took = run_source(port, n, sessions, size, timeout=deadline)
    probe.stop()
    target = n + len(probe.samples)
    done = sink.wait(target, deadline)
    cpu = cpu_seconds(root_pid) - cpu0
    peak = rss.stop()
    if done is None:
        raise RuntimeError(f"{system}: the sink got {sink.count} of {target} within {deadline}s")
    return Result(
        system=system,
        accepted_per_s=n / took,
        end_to_end_per_s=n / (done - t0),
        p50_ms=percentile(probe.samples, 50) * 1000,
        p99_ms=percentile(probe.samples, 99) * 1000,
        peak_rss_mib=peak / 1024,
        probe_samples=len(probe.samples),
        cpu_ms_per_msg=cpu / target * 1000,
    )


def run_mailwarden(n: int, sessions: int, size: int, workers: int, deadline: float) -> Result:
    with tempfile.TemporaryDirectory(prefix="mw-bench-", dir=str(ROOT / "bench")) as tmp:
        sink_port, port = free_port(), free_port()
        cfg = Path(tmp) / "mailwarden.toml"
        cfg.write_text(mailwarden_config(tmp, workers, port, sink_port, "example.test"))
        sink = Sink(sink_port)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailwarden", "serve", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            cwd=tmp,
            start_new_session=True,  # stop_group stops its workers too
        )
        try:
            wait_port(port)
            return _measure("mailwarden", port, proc.pid, sink, n, sessions, size, deadline)
        finally:
            stop_group(proc, timeout=30)
            sink.stop()


def run_postfix(n: int, sessions: int, size: int, deadline: float) -> Result:
    from bench.postfix_relay import PostfixRelay

    with tempfile.TemporaryDirectory(prefix="pf-bench-", dir=str(ROOT / "bench")) as tmp:
        sink_port, port = free_port(), free_port()
        sink = Sink(sink_port)
        relay = PostfixRelay(
            Path(tmp), port=port, nexthop_port=sink_port, relay_domain="example.test"
        )
        relay.start()
        try:
            wait_port(port)
            return _measure("postfix", port, relay.master_pid(), sink, n, sessions, size, deadline)
        finally:
            relay.stop()
            sink.stop()


def _median(results: list[Result]) -> Result:
    def med(attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results))

    return Result(
        results[0].system,
        med("accepted_per_s"),
        med("end_to_end_per_s"),
        med("p50_ms"),
        med("p99_ms"),
        med("peak_rss_mib"),
        int(med("probe_samples")),
        med("cpu_ms_per_msg"),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--size", type=int, default=10_240)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="mailwarden worker processes")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds per phase")
    ap.add_argument("--only", choices=["mailwarden", "postfix"], default=None)
    args = ap.parse_args()

    runs: dict[str, list[Result]] = {"mailwarden": [], "postfix": []}
    for i in range(args.runs):
        for system in ("postfix", "mailwarden"):
            if args.only and system != args.only:
                continue
            if system == "mailwarden":
                r = run_mailwarden(
                    args.messages, args.sessions, args.size, args.workers, args.deadline
                )
            else:
                r = run_postfix(args.messages, args.sessions, args.size, args.deadline)
            runs[system].append(r)
            print(
                f"run {i + 1} {system:<10} accept {r.accepted_per_s:7.0f}/s  "
                f"e2e {r.end_to_end_per_s:7.0f}/s  p50 {r.p50_ms:6.1f} ms  "
                f"p99 {r.p99_ms:6.1f} ms  rss {r.peak_rss_mib:6.1f} MiB  "
                f"cpu {r.cpu_ms_per_msg:.2f} ms/msg",
                flush=True,
            )
    medians = {k: _median(v) for k, v in runs.items() if v}
    print("\nmedians:")
    for r in medians.values():
        print(
            f"  {r.system:<10} accept {r.accepted_per_s:7.0f}/s  e2e {r.end_to_end_per_s:7.0f}/s"
            f"  p50 {r.p50_ms:6.1f} ms  p99 {r.p99_ms:6.1f} ms  rss {r.peak_rss_mib:6.1f} MiB"
            f"  cpu {r.cpu_ms_per_msg:.2f} ms/msg"
        )
    if len(medians) == 2:
        mw, pf = medians["mailwarden"], medians["postfix"]
        print(
            f"  ratio mailwarden/postfix: accept {mw.accepted_per_s / pf.accepted_per_s:.2f}x"
            f", end-to-end {mw.end_to_end_per_s / pf.end_to_end_per_s:.2f}x"
        )
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"relay-{stamp}.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "runs": {k: [asdict(r) for r in v] for k, v in runs.items()},
                "medians": {k: asdict(v) for k, v in medians.items()},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
