"""App speed through its HTTP API: cold start, time to first streamed token, concurrent users.

    .venv/bin/python benchmarks/bench_app.py [--model demo] [--clients 4] [--questions 5]

Starts ``app.py`` in a subprocess (cold: a fresh Python), times it to the first HTTP 200, then
drives it with gradio_client: one client opens scikit-image's ihc.png and asks a question (first
streamed token, full answer), then N clients each open the image and ask M questions at once.
When the demo weights are absent, a stand-in of the same architecture (the demo's encoder arch,
SmolLM2-135M, untrained aggregator/projector) is saved to a temp dir and used; the output says so.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What tissue is this?", "Is there tumour?", "Describe the glands.",
             "Is there inflammation?", "What stain is this?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_model(name: str, tmp: Path) -> tuple[str, str]:
    """(model argument for app.py, description); a stand-in when the named weights are missing."""
    from pathvlm.errors import ModelError
    from pathvlm.model import ModelConfig, build_model, load_model

    try:
        load_model(name, device="cpu")
        return name, name
    except ModelError as exc:
        print(f"note: {exc}\n      using a stand-in: openclip:pathvlm-vit-s-minilm + SmolLM2-135M, "
              "untrained aggregator/projector (same sizes as the demo model)")
    cfg = ModelConfig(encoder="openclip:pathvlm-vit-s-minilm", tile_mpp=1.0, tile_size=112)
    build_model(cfg).save_pretrained(tmp / "standin")
    return str(tmp / "standin"), "stand-in (vit-s-minilm + SmolLM2-135M, untrained heads)"


def wait_http(url: str, proc: subprocess.Popen, limit: float = 300) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not up after {limit}s")


def text(message: dict) -> str:
    c = message["content"]
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if isinstance(p, dict))


def ask_timed(client, question: str) -> tuple[float, float, str]:
    """(seconds to the first streamed token, seconds to the full answer, answer)."""
    t0 = time.perf_counter()
    first = None
    job = client.submit(question, "active slide", False, api_name="/ask")
    for out in job:
        chat = out[0]
        if first is None and chat and chat[-1]["role"] == "assistant" and text(chat[-1]):
            first = time.perf_counter() - t0
    final = job.result()
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, text(final[0][-1])


def open_image(client, image: str) -> str:
    from gradio_client import handle_file

    return client.predict(handle_file(image), "", "H&E", api_name="/open")[-1]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("PATHVLM_MODEL", "demo"))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import skimage
    from gradio_client import Client

    image = str(Path(skimage.__file__).parent / "data" / "ihc.png")
    with tempfile.TemporaryDirectory() as tmp:
        model_arg, described = pick_model(args.model, Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        cmd = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--model", model_arg,
               "--max-new-tokens", str(args.max_new_tokens)]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            cold = wait_http(url, proc)
            print(f"model: {described}; max_new_tokens {args.max_new_tokens}; "
                  f"{os.cpu_count()} CPUs visible, torch threads default")
            print(f"cold start to first HTTP 200: {cold:.1f} s")
            c = Client(url, verbose=False)
            t = time.perf_counter()
            status = open_image(c, image)
            print(f"open + embed ihc.png: {time.perf_counter() - t:.2f} s ({status})")
            t = time.perf_counter()
            status = open_image(c, image)
            print(f"reopen (cache): {time.perf_counter() - t:.2f} s ({status})")
            first, total, answer = ask_timed(c, QUESTIONS[0])
            print(f"single client: first token {first:.2f} s, full answer {total:.2f} s "
                  f"({len(answer)} chars)")

            latencies: list[float] = []
            firsts: list[float] = []
            failures: list[str] = []
            lock = threading.Lock()

            def user(i: int) -> None:
                try:
                    cl = Client(url, verbose=False)
                    open_image(cl, image)
                    for q in range(args.questions):
                        f, tot, ans = ask_timed(cl, QUESTIONS[q % len(QUESTIONS)])
                        if not ans.strip():
                            raise RuntimeError(f"empty answer to question {q + 1}")
                        with lock:
                            latencies.append(tot)
                            firsts.append(f)
                except Exception as exc:  # noqa: BLE001 - a benchmark counts failures, any kind
                    with lock:
                        failures.append(f"client {i}: {exc}")

            t = time.perf_counter()
            threads = [threading.Thread(target=user, args=(i,)) for i in range(args.clients)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t
            n = args.clients * args.questions
            print(f"{args.clients} clients x {args.questions} questions: {len(latencies)}/{n} answered "
                  f"in {wall:.1f} s; failures: {failures or 'none'}")
            if latencies:
                print(f"  full answer  p50 {pct(latencies, 50):.2f} s  p95 {pct(latencies, 95):.2f} s")
                print(f"  first token  p50 {pct(firsts, 50):.2f} s  p95 {pct(firsts, 95):.2f} s")
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
