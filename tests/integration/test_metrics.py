"""The Prometheus endpoint: scraped over HTTP, parsed with prometheus-client's own parser,
and its counters compared with the audit log they are taken from."""

from __future__ import annotations

import socket
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from connector.audit_chain import read_entries
from connector.config import load_settings, settings_from_text
from connector.config_template import render_config
from connector.errors import ConfigError, PermissionDenied, QueryRejected
from connector.server import RunningServer, start_server
from tests.conftest import (
    Member,
    connect,
    from_template,
    policy_text,
    run_cli,
    servers,
    write_defects_csv,
)

PURPOSE = "quality-benchmarking"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _homes(folder: Path, make: Callable[[str], Member]) -> list[Member]:
    provider, grantee = make("carmaker"), make("supplier-a")
    provider.ingest(write_defects_csv(folder / "d.csv"), "part_defects")
    limits = "limits: {queries_per_day: 50, rows_per_day: 100000}\n"
    provider.write_policy("q.yaml", policy_text("q", members="[supplier-a]") + limits)
    provider.write_policy("draft.yaml", policy_text("draft", members="[supplier-a]"), sign=False)
    config = provider.home / "connector.toml"
    text = config.read_text()
    assert '# listen = "127.0.0.1:9464"' in text
    config.write_text(text.replace('# listen = "127.0.0.1:9464"', 'listen = "127.0.0.1:0"'))
    return [provider, grantee]


@pytest.fixture(scope="module")
def served(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> tuple[Member, Member, RunningServer]:
    provider, grantee = from_template(module_dir, dataspace, "metrics", _homes)
    server = module_serve(provider)
    with connect(server, grantee) as peer:
        peer.catalog()
        peer.query("SELECT plant, defects FROM part_defects", PURPOSE)
        peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE)
        peer.explain("SELECT plant FROM part_defects", PURPOSE)
        with pytest.raises(PermissionDenied):
            peer.query("SELECT plant FROM part_defects", "marketing")
        with pytest.raises(QueryRejected):
            peer.query("SELECT * FROM read_csv('/etc/passwd')", PURPOSE)
    server.provider.audit.checkpoint()
    return provider, grantee, server


def scrape(server: RunningServer) -> Samples:
    """Every sample of /metrics by name and labels, parsed by prometheus-client."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _audit(provider: Member) -> list[dict[str, Any]]:
    return list(read_entries(provider.home / "audit" / "audit.jsonl"))


def test_request_counters_match_the_audit_log(served: tuple[Member, Member, RunningServer]) -> None:
    provider, _, server = served
    samples = scrape(server)
    entries = _audit(provider)
    requests = Counter(
        (str(e["kind"]), str(e["outcome"])) for e in entries if e["type"] == "request"
    )
    assert set(requests) >= {
        ("catalog", "answered"),
        ("query", "answered"),
        ("explain", "answered"),
        ("query", "denied"),
        ("query", "rejected"),
    }
    counted = {
        (labels[0][1], labels[1][1]): value
        for (name, labels), value in samples.items()
        if name == "connector_requests_total"
    }
    assert counted == {key: float(n) for key, n in requests.items()}
    sent = [e for e in entries if e["type"] == "request"]
    assert samples["connector_rows_sent_total", ()] == sum(int(e["rows"]) for e in sent) > 200
    assert samples["connector_bytes_sent_total", ()] == sum(int(e["bytes"]) for e in sent) > 0
    for kind in ("catalog", "explain", "query"):
        key = ("connector_request_duration_seconds_count", (("kind", kind),))
        assert samples[key] == sum(n for (k, _), n in requests.items() if k == kind)


def test_audit_entries_and_the_last_checkpoint_match_the_log(
    served: tuple[Member, Member, RunningServer],
) -> None:
    provider, _, server = served
    samples = scrape(server)
    entries = _audit(provider)
    by_type = Counter(str(e["type"]) for e in entries)
    assert {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "connector_audit_entries_total"
    } == {kind: float(n) for kind, n in by_type.items()}
    checkpoint = [e for e in entries if e["type"] == "checkpoint"][-1]
    assert samples["connector_audit_last_checkpoint_seq", ()] == checkpoint["seq"]
    assert samples["connector_audit_last_seq", ()] == entries[-1]["seq"]
    assert samples["connector_audit_last_checkpoint_timestamp_seconds", ()] > 1.7e9


def test_policies_quotas_and_active_queries(served: tuple[Member, Member, RunningServer]) -> None:
    _, _, server = served
    samples = scrape(server)
    assert samples["connector_policies_in_force", ()] == 1
    assert samples["connector_policy_files_skipped", (("reason", "unsigned"),)] == 1
    assert samples["connector_policy_reloads_total", ()] >= 1
    assert samples["connector_active_queries", ()] == 0
    # Two answered queries under policy q, which has daily quotas.
    member_policy = (("member", "supplier-a"), ("policy", "q"))
    assert samples["connector_quota_queries_today", member_policy] == 2
    assert samples["connector_quota_rows_today", member_policy] == 201
    assert ("connector_ingests_total", ()) not in samples  # no ingest while serving yet


def test_metrics_are_per_server_not_in_the_global_registry(
    served: tuple[Member, Member, RunningServer],
) -> None:
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("connector_requests_total") is None
    assert served[2].metrics.registry is not REGISTRY


def test_ingest_and_watch_hooks_count(served: tuple[Member, Member, RunningServer]) -> None:
    _, _, server = served
    server.metrics.ingest_finished("part_defects", "append", 10, ok=True)
    server.metrics.ingest_finished("part_defects", "append", 0, ok=False)
    server.metrics.watched_file("loaded")
    samples = scrape(server)
    loaded = (("dataset", "part_defects"), ("mode", "append"), ("outcome", "loaded"))
    assert samples["connector_ingests_total", loaded] == 1
    assert samples["connector_ingested_rows_total", (("dataset", "part_defects"),)] == 10
    assert samples["connector_watched_files_total", (("outcome", "loaded"),)] == 1
    with pytest.raises(ValueError, match="outcome"):
        server.metrics.watched_file("maybe")


@pytest.mark.parametrize("listen", ["9464", "http://127.0.0.1:9464", "host:99999", "a b:1"])
def test_a_bad_metrics_address_is_a_config_error(tmp_path: Path, listen: str) -> None:
    text = render_config("acme", "space", "127.0.0.1:0").replace(
        '# listen = "127.0.0.1:9464"', f'listen = "{listen}"'
    )
    with pytest.raises(ConfigError, match=r"\[metrics\] listen must be \"HOST:PORT\""):
        settings_from_text(text, tmp_path)


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    text = render_config("acme", "space", "127.0.0.1:0")
    assert settings_from_text(text, tmp_path).metrics.listen == ""


def test_a_metrics_port_in_use_stops_the_start_with_the_reason(
    tmp_path: Path, dataspace: Path
) -> None:
    provider, _ = from_template(tmp_path, dataspace, "metrics", _homes)
    config = provider.home / "connector.toml"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = config.read_text()
        assert 'listen = "127.0.0.1:0"' in text
        config.write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
        with pytest.raises(ConfigError, match=rf"cannot serve metrics on 127.0.0.1:{port}"):
            start_server(load_settings(provider.home), "127.0.0.1:0")
    # Nothing was left holding the home: a server starts on it at once.
    config.write_text(text)
    with servers() as start:
        assert start(provider).metrics_port


def test_live_ingests_and_watched_files_are_counted(
    served: tuple[Member, Member, RunningServer], tmp_path: Path
) -> None:
    provider, _, server = served
    before = scrape(server)
    csv = write_defects_csv(tmp_path / "lots.csv", rows=30)
    assert run_cli("ingest", "--home", provider.home, csv, "--dataset", "lots") == 0
    drop = tmp_path / "drop"
    drop.mkdir()
    write_defects_csv(drop / "a.csv", rows=5)
    (drop / "bad.csv").write_text("plant,defects\nx\n")
    watch = ("ingest", "--home", provider.home, "--watch", drop, "--dataset", "lots", "--once")
    assert run_cli(*watch, "--append") == 1  # one file set aside
    after = scrape(server)

    def grew(name: str, labels: tuple[tuple[str, str], ...]) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    lots = ("dataset", "lots")
    assert grew("connector_ingests_total", (lots, ("mode", "replace"), ("outcome", "loaded"))) == 1
    assert grew("connector_ingests_total", (lots, ("mode", "append"), ("outcome", "loaded"))) == 1
    assert grew("connector_ingests_total", (lots, ("mode", "append"), ("outcome", "failed"))) == 1
    assert grew("connector_ingested_rows_total", (lots,)) == 35
    assert grew("connector_watched_files_total", (("outcome", "loaded"),)) == 1
    assert grew("connector_watched_files_total", (("outcome", "failed"),)) == 1
