"""Soak test of the shared app: N logged-in clients open, ask, classify and draft in a loop.

    .venv/bin/python benchmarks/bench_soak.py [--clients 8] [--duration 300] [--model demo]

Starts ``app.py`` on 127.0.0.1 (a free port) with one login per client, a slide root holding one
distinct slide per client (crops of scikit-image's ihc.png) and the default limits. Each client
loops, bounded by ``--duration`` and ``--max-loops``: clear the chat, open its slide (by upload
and by server path, alternately), ask a question naming itself, run zero-shot, draft a report.
Every request must be answered or refused with a message; a client that ever sees another's
question, slide or report counts a cross-session leak. The server's RSS is sampled every 2 s.
When the demo weights are absent, bench_app.py's stand-in (same architecture) is used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_app import free_port, pct, pick_model, text, wait_http


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Tally:
    """Latencies and outcomes of every request, and leaks seen, across client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.outcome: dict[str, int] = defaultdict(int)
        self.by_kind: dict[str, int] = defaultdict(int)
        self.refusals: dict[str, int] = defaultdict(int)  # message -> count
        self.leaks: list[str] = []
        self.errors: list[str] = []

    def add(self, kind: str, secs: float, outcome: str, note: str = "") -> None:
        with self.lock:
            self.latency[kind].append(secs)
            self.outcome[outcome] += 1
            self.by_kind[f"{kind} {outcome}"] += 1
            if outcome == "failed":
                self.errors.append(f"{kind}: {note}"[:300])

    def leak(self, note: str) -> None:
        with self.lock:
            self.leaks.append(note[:300])


def make_slides(root: Path, n: int) -> list[str]:
    """One distinct image per client (a 256 px crop of ihc.png at its own offset)."""
    import skimage
    from PIL import Image

    ihc = Image.open(Path(skimage.__file__).parent / "data" / "ihc.png").convert("RGB")
    names = []
    for i in range(n):
        x, y = (i * 37) % 256, (i * 53) % 256
        name = f"soak_client{i}"
        ihc.crop((x, y, x + 256, y + 256)).save(root / f"{name}.png")
        names.append(name)
    return names


def client_loop(i: int, url: str, root: Path, names: list[str], deadline: float, args: argparse.Namespace,
                tally: Tally) -> None:
    """One user: clear, open, ask, zero-shot, report, until the deadline or ``max_loops``."""
    from gradio_client import Client, handle_file

    me, others = names[i], set(names) - {names[i]}
    user = f"user{i}"
    try:
        c = Client(url, auth=(user, f"pw{i}"), verbose=False, download_files=str(root.parent / user))
    except Exception as exc:  # noqa: BLE001 - a benchmark counts failures of any kind
        tally.add("login", 0.0, "failed", repr(exc))
        return

    def call(kind: str, *inputs, api: str) -> tuple | None:
        t0 = time.perf_counter()
        try:
            out = c.submit(*inputs, api_name=api).result(timeout=args.request_timeout)
        except Exception as exc:  # noqa: BLE001 - any failure is counted and reported
            msg = str(exc).strip()
            # gradio's refusals (queue full, upload too large) carry a message: refused, not failed
            tally.add(kind, time.perf_counter() - t0, "refused" if msg else "failed", repr(exc))
            if msg:
                with tally.lock:
                    tally.refusals[f"{kind}: {msg}"[:120]] += 1
            return None
        out = out if isinstance(out, tuple) else (out,)
        status = out[-1] if isinstance(out[-1], str) else ""
        refused = status.startswith(("Could not", "Zero-shot failed"))
        tally.add(kind, time.perf_counter() - t0, "refused" if refused else "answered")
        if refused:
            with tally.lock:
                tally.refusals[status[:120]] += 1
        blob = json.dumps([o for o in out if isinstance(o, (str, list, dict))], default=str)
        for other in others:
            if other in blob:
                tally.leak(f"client {i} saw {other} in {kind}: {blob[:200]}")
        return out

    loops = 0
    while time.time() < deadline and loops < args.max_loops:
        loops += 1
        call("clear", api="/clear")
        src = (handle_file(str(root / f"{me}.png")), "") if loops % 2 else (None, f"{me}.png")
        call("open", *src, "H&E", api="/open")
        if time.time() >= deadline:
            break
        question = f"client {i} loop {loops}: what tissue is this?"
        out = call("ask", question, "active slide", False, api="/ask")
        if out is not None:
            asked = [text(m) for m in out[0] if m.get("role") == "user"]
            if asked != [question]:
                tally.leak(f"client {i} chat shows {asked}")
        call("zeroshot", "", "colorectal tissue", api="/zeroshot")
        if time.time() >= deadline:
            break
        out = call("report", "", "", None, None, None, api="/report_colorectal_biopsy")
        if out is not None and out[1]:
            slides = [s["name"] for s in json.loads(Path(out[1]).read_text(encoding="utf-8"))["slides"]]
            if slides != [me]:
                tally.leak(f"client {i} report covers {slides}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("PATHVLM_MODEL", "demo"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    p.add_argument("--max-loops", type=int, default=1000, help="loops per client at most")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--json-out", help="also write the figures here")
    args = p.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    with tempfile.TemporaryDirectory(prefix="pathvlm-soak-") as tmp:
        tmp = Path(tmp)
        root = tmp / "slides"
        root.mkdir()
        names = make_slides(root, args.clients)
        auth = tmp / "auth.txt"
        auth.write_text("".join(f"user{i}:pw{i}\n" for i in range(args.clients)))
        model_arg, described = pick_model(args.model, tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        cmd = [sys.executable, str(REPO / "app.py"), "--host", "127.0.0.1", "--port", str(port),
               "--model", model_arg, "--max-new-tokens", str(args.max_new_tokens), "--slide-root", str(root),
               "--auth-file", str(auth), "--audit-log", str(tmp / "audit.jsonl")]
        log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below; a pipe nobody reads would stall the app
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            cold = wait_http(url, proc)
            start = time.time()
            deadline = start + args.duration
            samples: list[tuple[float, int]] = []
            stop = threading.Event()

            def monitor() -> None:
                while not stop.is_set():
                    try:
                        samples.append((time.time() - start, rss_kib(proc.pid)))
                    except OSError:
                        return
                    stop.wait(2.0)

            mon = threading.Thread(target=monitor, daemon=True)
            mon.start()
            tally = Tally()
            threads = [threading.Thread(target=client_loop, args=(i, url, root, names, deadline, args, tally))
                       for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(args.duration + 2 * args.request_timeout)
            wall = time.time() - start
            stop.set()
            mon.join(5)
            peak = rss_kib(proc.pid, "VmHWM")
            audit_lines = len((tmp / "audit.jsonl").read_text(encoding="utf-8").splitlines())
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            tracebacks = (tmp / "server.log").read_text(errors="replace").count("Traceback")
        all_lat = [x for v in tally.latency.values() for x in v]
        after_1min = next((r for t, r in samples if t >= 60), samples[-1][1] if samples else 0)
        end_rss = samples[-1][1] if samples else 0
        total = sum(tally.outcome.values())
        figures = {
            "model": described, "clients": args.clients, "duration_s": round(wall, 1), "cold_start_s": round(cold, 1),
            "cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
            "requests": total, "answered": tally.outcome["answered"], "refused_with_message": tally.outcome["refused"],
            "failed": tally.outcome["failed"], "cross_session_leaks": len(tally.leaks),
            "p50_s": round(pct(all_lat, 50), 2) if all_lat else None,
            "p95_s": round(pct(all_lat, 95), 2) if all_lat else None,
            "per_kind": {k: {"n": len(v), "p50_s": round(pct(v, 50), 2), "p95_s": round(pct(v, 95), 2)}
                         for k, v in sorted(tally.latency.items())},
            "peak_rss_mib": round(peak / 1024), "rss_after_1min_mib": round(after_1min / 1024),
            "rss_end_mib": round(end_rss / 1024),
            "rss_end_vs_1min": round(end_rss / after_1min, 3) if after_1min else None,
            "audit_lines": audit_lines, "server_tracebacks": tracebacks,
            "outcomes_by_kind": dict(tally.by_kind), "refusals": dict(tally.refusals),
        }
    print(f"model: {described}; {args.clients} clients for {wall:.0f} s; {os.cpu_count()} CPUs visible; "
          f"load average at end {figures['load_avg_1m_at_end']}")
    print(f"requests: {total}: {figures['answered']} answered, {figures['refused_with_message']} refused "
          f"with a message, {figures['failed']} failed")
    print(f"latency over all requests: p50 {figures['p50_s']} s, p95 {figures['p95_s']} s")
    for kind, v in figures["per_kind"].items():
        print(f"  {kind:9s} n={v['n']:4d}  p50 {v['p50_s']:6.2f} s  p95 {v['p95_s']:6.2f} s")
    print(f"server RSS: peak {figures['peak_rss_mib']} MiB; after the first minute "
          f"{figures['rss_after_1min_mib']} MiB; at the end {figures['rss_end_mib']} MiB "
          f"(x{figures['rss_end_vs_1min']})")
    print(f"cross-session leaks: {len(tally.leaks)}; audit log lines: {audit_lines}; "
          f"tracebacks in the server log: {tracebacks}")
    for message, n in sorted(tally.refusals.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  refused x{n}: {message}")
    for line in tally.leaks[:5] + tally.errors[:5]:
        print("  " + line)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if not tally.leaks and not figures["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
