"""Counters for `GET /metrics`, in the Prometheus text format (0.0.4), written by hand: no extra package.

One process's view: with `--workers N`, each worker counts its own requests.
"""

from __future__ import annotations

import bisect
import collections
import time

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for bound, n in zip((*self.buckets, "+Inf"), self.counts):
            total += n
            le = bound if isinstance(bound, str) else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {self.sum:.6g}", f"{name}_count{braces} {self.count}"]


class Metrics:
    def __init__(self, model_id: str):
        self.model_id = model_id
        self.started = time.time()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latency: dict[str, Histogram] = {}
        self.batches = Histogram(BATCH_BUCKETS)
        self.in_flight = 0

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] += 1
        self.latency.setdefault(path, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int) -> None:
        self.batches.observe(size)

    def answered(self, prefix: str = "/v1/") -> int:
        return sum(n for (path, _), n in self.requests.items() if path.startswith(prefix))

    def render(self) -> str:
        lines = ["# HELP hwr_requests_total HTTP requests answered, by path and status code.",
                 "# TYPE hwr_requests_total counter"]
        lines += [f'hwr_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())]
        lines += ["# HELP hwr_request_duration_seconds Time from a request's arrival to its response, by path.",
                  "# TYPE hwr_request_duration_seconds histogram"]
        for path, hist in sorted(self.latency.items()):
            lines += hist.lines("hwr_request_duration_seconds", f'path="{path}"')
        lines += ["# HELP hwr_batch_size Images per forward pass (dynamic batching).",
                  "# TYPE hwr_batch_size histogram", *self.batches.lines("hwr_batch_size"),
                  "# HELP hwr_requests_in_flight Requests being answered now.",
                  "# TYPE hwr_requests_in_flight gauge", f"hwr_requests_in_flight {self.in_flight}",
                  "# HELP hwr_model_info The model being served.", "# TYPE hwr_model_info gauge",
                  f'hwr_model_info{{model_id="{self.model_id}"}} 1',
                  "# HELP hwr_start_time_seconds When this server process started (Unix time).",
                  "# TYPE hwr_start_time_seconds gauge", f"hwr_start_time_seconds {self.started:.3f}"]
        return "\n".join(lines) + "\n"
