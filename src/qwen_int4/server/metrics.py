"""/metrics in the Prometheus text format (version 0.0.4), written by hand: no client library.

Counters of the HTTP layer live here; the engine's gauges and token totals are read from
LLMEngine.stats() when the page is rendered.
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter

PREFIX = "qwen_int4"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {cumulative}")
        return out


class Metrics:
    """Thread-safe counters of the server; `render` adds the engine's numbers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = Counter()  # (endpoint, status code) -> count
        self.ttft = Histogram(TTFT_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def render(self, model_name: str, engine_stats: dict[str, int] | None) -> str:
        label = f'model_name="{model_name}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {PREFIX}_{name} {help_text}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")
            lines.extend(f"{PREFIX}_{name}{{{labels}}} {value}" for labels, value in samples)

        with self._lock:
            requests = sorted(self.requests.items())
            ttft_lines = self.ttft.lines(f"{PREFIX}_time_to_first_token_seconds", label)
        metric("requests_total", "counter", "Finished HTTP requests by endpoint and status code.",
               [(f'{label},endpoint="{e}",status="{s}"', n) for (e, s), n in requests])
        if engine_stats is not None:
            for name, kind, key, help_text in (
                ("prompt_tokens_total", "counter", "prompt_tokens_total", "Prompt tokens of accepted requests."),
                ("generation_tokens_total", "counter", "generation_tokens_total", "Generated tokens."),
                ("num_requests_waiting", "gauge", "num_waiting", "Sequences waiting to be scheduled (queue length)."),
                ("num_requests_running", "gauge", "num_running", "Sequences in the running batch."),
                ("kv_cache_blocks_used", "gauge", "kv_blocks_used", "KV cache blocks held by sequences."),
                ("kv_cache_blocks_total", "gauge", "kv_blocks_total", "KV cache blocks in the pool."),
                ("num_preemptions_total", "counter", "preemptions_total", "Sequences preempted for lack of blocks."),
            ):
                metric(name, kind, help_text, [(label, engine_stats[key])])
        lines.append(f"# HELP {PREFIX}_time_to_first_token_seconds Time from arrival to the first generated token.")
        lines.append(f"# TYPE {PREFIX}_time_to_first_token_seconds histogram")
        lines.extend(ttft_lines)
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a rendered page (for tests and the benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
