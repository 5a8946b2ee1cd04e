"""Serving under load: closed-loop clients against a real `hwr serve` on 127.0.0.1, batching on and off.

    python bench/serve_load.py [--model runs/default] [--onnx FILE] [--clients 1,8,32] [--seconds 3]
                               [--image canvas|mnist] [--max-batch 64] [--max-wait-ms 5] [--workers 1]

For each model (the checkpoint, and its ONNX export: made in a temporary folder unless --onnx is
given) and each mode (dynamic batching: --max-batch 64; per-request inference: --max-batch 1), one
server process is started on a free loopback port; for each client count, that many clients each
send a request, wait for its answer and send the next (closed loop) over a kept-alive connection,
for --seconds after a warm-up of --warmup seconds (at most --max-requests requests per cell).
Reported: requests/s, p50 and p99 latency as the client sees it, and the mean images per forward
pass (from the server's /metrics, over the measured window), and the server process's CPU time per
request (all its threads, and with --workers N all N worker processes, from /proc: unlike the wall
clock, hardly changed by other load on the machine). The server and the clients share the
machine's cores; the clients are one asyncio process writing raw HTTP/1.1, to cost little.

The image: "canvas" is a 280x280 PNG of a drawn 7, what the page sends; "mnist" a 28x28 test
image of the built-in sample, what a program holding MNIST-style data sends.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's hwr_dist, as the servers it starts (PYTHONPATH below)
HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_image(kind: str) -> bytes:
    from PIL import Image, ImageDraw

    buf = io.BytesIO()
    if kind == "canvas":
        img = Image.new("RGB", (280, 280), "white")
        ImageDraw.Draw(img).line([(70, 60), (210, 60), (120, 230)], fill="black", width=20)
    else:
        from hwr_dist.data import load_dataset

        img = Image.fromarray(load_dataset("mnist-sample", ROOT).test.images[0].numpy())
    img.save(buf, "PNG")
    return buf.getvalue()


class Server:
    def __init__(self, model: Path, max_batch: int, max_wait_ms: float, workers: int, log: Path):
        self.port, self.workers = free_port(), workers
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hwr_dist.cli", "serve", str(model), "--host", HOST, "--port", str(self.port),
             "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--workers", str(workers)],
            cwd=ROOT, stdout=self.log, stderr=self.log,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://{HOST}:{self.port}/healthz", timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"the server did not start; see {log}")

    def batches(self) -> tuple[float, float]:
        """(images, forward passes) so far, from /metrics; (nan, nan) with several workers, where /metrics
        answers for whichever worker took the connection."""
        if self.workers > 1:
            return float("nan"), float("nan")
        text = urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=10).read().decode()
        total = float(re.search(r"^hwr_batch_size_sum (\S+)$", text, re.M).group(1))
        count = float(re.search(r"^hwr_batch_size_count (\S+)$", text, re.M).group(1))
        return total, count

    def cpu_s(self) -> float:
        """CPU seconds the server has used (all its threads, and its worker processes while they run):
        comparable under a shared load."""
        children = Path(f"/proc/{self.proc.pid}/task").glob("*/children")
        pids = [self.proc.pid] + [int(pid) for listing in children for pid in listing.read_text().split()]
        total = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:  # a worker that has just exited
                continue
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()


async def client(port: int, request: bytes, until: float, measure_from: float, max_requests: int,
                 latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while time.perf_counter() < until and len(latencies) < max_requests:
            t = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"server answered {head.splitlines()[0].decode()}")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            await reader.readexactly(length)
            if t >= measure_from:
                latencies.append(time.perf_counter() - t)
    finally:
        writer.close()


async def load(server: Server, clients: int, image: bytes, warmup: float, seconds: float, max_requests: int) -> dict:
    request = (f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/png\r\n"
               f"Content-Length: {len(image)}\r\n\r\n").encode() + image
    start = time.perf_counter()
    measure_from, until = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    tasks = [asyncio.create_task(client(server.port, request, until, measure_from, max_requests, latencies))
             for _ in range(clients)]
    await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
    before, cpu = await asyncio.to_thread(server.batches), server.cpu_s()
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    cpu = server.cpu_s() - cpu
    after = await asyncio.to_thread(server.batches)
    images, passes = after[0] - before[0], after[1] - before[1]
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "rps": len(latencies) / elapsed,
            "p50": 1000 * statistics.median(latencies), "p99": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "batch": images / passes if passes else float("nan"), "cpu_ms": 1000 * cpu / max(1, len(latencies))}


def onnx_export(model: Path, folder: Path) -> Path:
    from hwr_dist.commands.export import export_checkpoint

    return export_checkpoint(model, "onnx", out=folder / "model.onnx", echo=lambda s: None).path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "default", help="checkpoint or run directory")
    ap.add_argument("--onnx", type=Path, help="its ONNX export (default: exported to a temporary folder)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--max-requests", type=int, default=20000, help="most measured requests per cell")
    ap.add_argument("--image", choices=("canvas", "mnist"), default="canvas")
    ap.add_argument("--max-batch", type=int, default=64, help="batching on (off is --max-batch 1)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=1, help="server processes (hwr serve --workers)")
    args = ap.parse_args()
    image = test_image(args.image)
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"checkpoint": args.model, "onnx": args.onnx or onnx_export(args.model, Path(tmp))}
        for kind, path in models.items():
            for mode, max_batch in (("batching", args.max_batch), ("per request", 1)):
                server = Server(path, max_batch, args.max_wait_ms, args.workers, Path(tmp) / f"{kind}-{max_batch}.log")
                try:
                    for n in clients:
                        r = asyncio.run(load(server, n, image, args.warmup, args.seconds, args.max_requests))
                        rows.append({"model": kind, "mode": mode, **r})
                        print(f"{kind:10s} {mode:11s} {n:3d} clients: {r['rps']:7.1f} req/s  p50 {r['p50']:6.1f} ms  "
                              f"p99 {r['p99']:6.1f} ms  mean batch {r['batch']:5.1f}  "
                              f"server CPU {r['cpu_ms']:5.2f} ms/request", flush=True)
                finally:
                    server.stop()
    print_table(rows, args)


def print_table(rows: list[dict], args) -> None:
    print(f"\nimage: {args.image}; {args.seconds:g} s per cell after {args.warmup:g} s warm-up; batching = "
          f"--max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}; --workers {args.workers}; load at the end "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| model | mode | clients | requests/s | p50 ms | p99 ms | mean batch | server CPU ms/request |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['clients']} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
              f"{r['batch']:.1f} | {r['cpu_ms']:.2f} |")
    for kind in dict.fromkeys(r["model"] for r in rows):
        top = max(r["clients"] for r in rows)
        on = next(r for r in rows if r["model"] == kind and r["mode"] == "batching" and r["clients"] == top)
        off = next(r for r in rows if r["model"] == kind and r["mode"] == "per request" and r["clients"] == top)
        print(f"\n{kind}, {top} clients: batching gives {on['rps'] / off['rps']:.2f}x the requests/s of per-request "
              f"inference; p99 {on['p99']:.1f} ms with batching")


if __name__ == "__main__":
    main()
