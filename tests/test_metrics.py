"""The server's metrics: Prometheus text on HTTP /metrics and `metrics` records in
metrics.jsonl, from a real server after real pushes."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

from conftest import random_gradient, small_config, wait_until
from gradhub.codecs import codec_from_name
from gradhub.domain import PushMeta
from gradhub.models import build_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SAMPLE = re.compile(r'^gradhub_[a-z_]+(\{([a-z]+="[^"]*",?)*\})? -?[0-9.e+-]+$|^gradhub_[a-z_]+\{.*\} inf$')


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) gradhub_[a-z_]+ ", line), line
            continue
        assert SAMPLE.match(line), f"not a Prometheus sample line: {line!r}"
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def test_metrics_show_staleness_per_worker_lag_and_refusals(serve, run_id):
    server = serve(small_config(run_id, mode="async", workers=2, max_staleness=2))
    server.register("a")
    server.register("b")
    encoded = [codec_from_name("none").encode(n, g) for n, g in random_gradient(build_model("cnn"), 0)]
    push = lambda worker, seq, base: server.client(worker).push(PushMeta(run_id, worker, seq, base), encoded, 10)  # noqa: E731
    for seq in (1, 2, 3):
        push("a", seq, seq - 1)  # staleness 0, versions 1..3
    push("b", 1, 1)  # staleness 2 -> version 4
    with pytest.raises(Exception, match="stale"):
        push("b", 2, 0)  # staleness 4 > 2: refused
    assert server.app.metrics_url is not None
    m = scrape(server.app.metrics_url)
    a = f'run="{run_id}",worker="a",rank="0"'
    b = f'run="{run_id}",worker="b",rank="1"'
    assert m[f'gradhub_version{{run="{run_id}"}}'] == 4
    assert m[f"gradhub_pushes_applied_total{{{a}}}"] == 3
    assert m[f"gradhub_pushes_applied_total{{{b}}}"] == 1
    assert m[f'gradhub_pushes_refused_total{{{b},reason="StalePush"}}'] == 1
    assert m[f'gradhub_push_staleness_bucket{{le="0",{a}}}'] == 3
    assert m[f'gradhub_push_staleness_bucket{{le="1",{b}}}'] == 0
    assert m[f'gradhub_push_staleness_bucket{{le="2",{b}}}'] == 1
    assert m[f'gradhub_push_staleness_bucket{{le="+Inf",{b}}}'] == 1
    assert m[f"gradhub_push_staleness_sum{{{b}}}"] == 2
    assert m[f"gradhub_version_lag{{{a}}}"] == 2  # a's last push was on version 2; server at 4
    assert m[f"gradhub_version_lag{{{b}}}"] == 3
    assert m[f'gradhub_live_workers{{run="{run_id}"}}'] == 2
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.app.metrics_url.replace("/metrics", "/other"), timeout=10)
    assert info.value.code == 404

    # The same figures reach metrics.jsonl as `metrics` records.
    path = server.app.metrics.path

    def latest():
        records = [json.loads(line) for line in path.read_text().splitlines()]
        found = [r for r in records if r["event"] == "metrics" and r["pushes_refused"] == 1]
        return found[-1] if found else None

    record = wait_until(latest, 10, "a metrics record after the pushes")
    assert record["version"] == 4 and record["pushes_applied"] == 4
    assert record["per_worker"]["b"] == {
        "rank": 1, "pushes_applied": 1, "pushes_refused": 1, "version_lag": 3, "waits": 0,
        "wait_seconds": 0.0, "staleness": {"2": 1},
    }
