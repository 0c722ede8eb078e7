"""Prometheus metrics on HTTP `/metrics`, in the text exposition format (version 0.0.4).

Written by hand rather than with prometheus_client: the server's counters already live
in `ServerStats`, and rendering them is a page of code, not a dependency. Everything is
rendered from one consistent `totals()` read per scrape.

Metric names (all prefixed `gradhub_`; labels `worker` and `rank` where per worker):
  version, steps, live_workers, updates_per_second, test_accuracy (gauges);
  pushes_applied_total, pushes_refused_total{reason}, pushes_dropped_total (backup
  workers' late pushes), bytes_pushed_total, bytes_pulled_total, wait_seconds_total,
  waits_total (counters); version_lag (gauge); push_staleness (histogram).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

#: Upper bounds of the staleness histogram's buckets (in versions), then +Inf.
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(**labels: Any) -> str:
    if not labels:
        return ""
    escaped = (
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), " ")}"'
        for k, v in labels.items()
    )
    return "{" + ",".join(escaped) + "}"


class _Page:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP gradhub_{name} {help_text}")
        self.lines.append(f"# TYPE gradhub_{name} {kind}")

    def sample(self, name: str, value: float, **labels: Any) -> None:
        self.lines.append(f"gradhub_{name}{_labels(**labels)} {float(value)!r}")


def render(status: dict[str, Any], totals: dict[str, Any]) -> str:
    """The exposition text for one scrape: `status` from the core, `totals` from the stats."""
    page = _Page()
    run = status["run_id"]
    for name, key, help_text in (
        ("version", "version", "model versions made (server updates)"),
        ("steps", "steps", "versions the run will make"),
        ("updates_per_second", "pushes_per_second", "pushes applied per second over the last 5 s"),
    ):
        page.family(name, "gauge", help_text)
        page.sample(name, status[key], run=run)
    page.family("live_workers", "gauge", "workers holding a lease")
    page.sample("live_workers", len(status["live_workers"]), run=run)
    if status.get("test_accuracy") is not None:
        page.family("test_accuracy", "gauge", "test accuracy of the last evaluation")
        page.sample("test_accuracy", status["test_accuracy"], run=run)

    workers: dict[str, dict[str, Any]] = totals["workers"]
    ranks = {w: ("" if c["rank"] is None else c["rank"]) for w, c in workers.items()}
    version = status["version"]
    per_worker = (
        ("pushes_applied_total", "counter", "pushes applied", "pushes_applied"),
        ("bytes_pushed_total", "counter", "bytes of pushes on the wire, framing included", "bytes_pushed"),
        ("bytes_pulled_total", "counter", "bytes of pulls on the wire, framing included", "bytes_pulled"),
        ("waits_total", "counter", "times held back at a sync barrier or an SSP pull", "waits"),
        ("wait_seconds_total", "counter", "seconds held back at a sync barrier or an SSP pull", "wait_seconds"),
    )
    for name, kind, help_text, key in per_worker:
        page.family(name, kind, help_text)
        for worker, counters in workers.items():
            page.sample(name, counters[key], run=run, worker=worker, rank=ranks[worker])
    page.family("pushes_refused_total", "counter", "pushes refused, by reason (the error's name)")
    for worker, counters in workers.items():
        for reason, count in sorted(counters["refused_by_reason"].items()):
            page.sample("pushes_refused_total", count, run=run, worker=worker, rank=ranks[worker], reason=reason)
    if totals.get("pushes_refused_unattributed"):
        page.sample("pushes_refused_total", totals["pushes_refused_unattributed"], run=run, worker="",
                    rank="", reason="unattributed")
    page.family("pushes_dropped_total", "counter", "late pushes dropped by backup workers")
    page.sample("pushes_dropped_total", totals["refused_by_reason"].get("LatePush", 0), run=run)
    page.family("version_lag", "gauge", "server version minus the version of the worker's last applied push")
    for worker, counters in workers.items():
        if counters["pushes_applied"]:
            page.sample("version_lag", version - counters["last_base_version"], run=run, worker=worker,
                        rank=ranks[worker])
    page.family("push_staleness", "histogram", "staleness of applied pushes, in versions")
    for worker, counters in workers.items():
        histogram = {int(s): n for s, n in counters["staleness"]["histogram"].items()}
        labels = {"run": run, "worker": worker, "rank": ranks[worker]}
        for bound in STALENESS_BUCKETS:
            cumulative = sum(n for s, n in histogram.items() if s <= bound)
            page.sample("push_staleness_bucket", cumulative, le=bound, **labels)
        count = sum(histogram.values())
        page.sample("push_staleness_bucket", count, le="+Inf", **labels)
        page.sample("push_staleness_sum", sum(s * n for s, n in histogram.items()), **labels)
        page.sample("push_staleness_count", count, **labels)
    return "\n".join(page.lines) + "\n"


class MetricsServer:
    """`GET /metrics` on its own thread; `bind` is host:port, port 0 picks a free one."""

    def __init__(self, bind: str, page: Callable[[], str]) -> None:
        host, _, port = bind.rpartition(":")
        produce = page

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = produce().encode()
                except Exception:
                    log.exception("rendering metrics failed")
                    self.send_error(500, "rendering metrics failed")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: " + format, *args)

        self._httpd = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
