"""The status endpoint: /metrics counts what a real node received and did, /healthz and
/readyz name the check that failed; served over HTTP on loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.config import Settings
from dicom_node.errors import ConfigError
from dicom_node.health import Probes, StatusServer
from dicom_node.jobs import JobStore
from dicom_node.loopback import free_port
from dicom_node.spool import Spool
from model import card

from dicom_factory import chest_image, ct_head
from helpers.dimse import associate, store
from helpers.environment import CALLING_AE, wait_until
from helpers.processes import NodeProcess
from peers import Storescp

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    """``(status, body)`` of one request to 127.0.0.1:``port``."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def verdict(port: int, path: str) -> tuple[int, dict[str, Any]]:
    code, body = get(port, path)
    return code, json.loads(body)


def failing(answer: dict[str, Any]) -> set[str]:
    return {name for name, check in answer["checks"].items() if not check["ok"]}


def scrape(port: int) -> Samples:
    """Every sample of /metrics, keyed by name and sorted labels."""
    code, body = get(port, "/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(samples: Samples, metric: str, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_a_node_received_classified_and_delivered(
        make_node: Any, serving_artifact: Path, tmp_path: Path) -> None:
    pacs = Storescp(tmp_path / "pacs", free_port())
    try:
        node = make_node(metrics_port=free_port(), max_pixels=300 * 300,
                         destinations=[f"PACS@127.0.0.1:{pacs.port}"],
                         allow_unvalidated_models=True)
        port = node.settings.metrics_port
        # Counters belong to the process (other tests' nodes count too): compare deltas.
        before = scrape(port)
        code, ready = verdict(port, "/readyz")
        assert code == 503 and failing(ready) == {"model"}, ready

        frontal = [chest_image(seed=i) for i in range(2)]
        lateral = chest_image(ViewPosition="LL")
        head = ct_head()
        too_large = chest_image(rows=400, columns=400)
        assert store(node, [*frontal, lateral, head, frontal[0]]) == [0] * 5
        assert store(node, [too_large]) == [0xC221]
        refused = associate(node.settings.port, [head], calling="STRANGER")
        assert refused.is_rejected

        card.install(serving_artifact, node.settings.model_dir, allow_unvalidated=True)
        wait_until(lambda: node.store.delivery_counts() == {"done": 4}, timeout=120,
                   what="two SRs and two evidence images delivered")
        # Outcomes are counted just after they are committed: the scrape waits for them.
        sent = "dicom_node_result_to_delivered_seconds_count"
        wait_until(lambda: value(scrape(port), sent, kind="dicom")
                   - value(before, sent, kind="dicom") >= 4, timeout=30,
                   what="four deliveries counted")
        after = scrape(port)
    finally:
        pacs.stop()

    def delta(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    received = "dicom_node_instances_received_total"
    assert delta(received, outcome="queued", reason="view_frontal") == 2
    assert delta(received, outcome="ignored", reason="view_lateral") == 1
    assert delta(received, outcome="ignored", reason="not_chest") == 1
    assert delta(received, outcome="duplicate", reason="duplicate") == 1
    assert delta(received, outcome="refused", reason="pixel_budget") == 1
    assert delta("dicom_node_associations_total", outcome="rejected") == 1
    assert delta("dicom_node_associations_total", outcome="accepted") == 2
    assert delta("dicom_node_receive_to_result_seconds_count") == 2
    assert delta("dicom_node_inference_batch_size_sum") == 2
    assert delta("dicom_node_inference_seconds_count") >= 1
    assert delta("dicom_node_deliveries_total", kind="dicom", outcome="done") == 4
    assert delta("dicom_node_result_to_delivered_seconds_count", kind="dicom") == 4
    # The node's states, read at the scrape.
    assert value(after, "dicom_node_jobs", state="done") == 2
    assert value(after, "dicom_node_jobs", state="ignored") == 2
    assert value(after, "dicom_node_jobs", state="queued") == 0
    assert value(after, "dicom_node_deliveries_by_state", state="done") == 4
    assert value(after, "dicom_node_model_loaded") == 1
    assert value(after, "dicom_node_model_info", name="cxr-covid-pneumonia",
                 version="0.0.1-untrained",
                 architecture="xception", validation="unvalidated") == 1
    assert value(after, "dicom_node_disk_free_bytes") > 0
    assert value(after, "process_resident_memory_bytes") > 0

    code, ready = verdict(port, "/readyz")
    assert code == 200 and not failing(ready), ready
    assert verdict(port, "/healthz") == (200, {"ok": True, "checks": {
        "worker": {"ok": True, "detail": "running"},
        "scheduler": {"ok": True, "detail": "running"},
        "receiver": {"ok": True, "detail": "running"}}})
    # No identifier of the images in anything it serves.
    served = b"".join(get(port, path)[1] for path in ("/metrics", "/readyz", "/healthz"))
    for identifier in ("Test^Synthetic", "SYN-0001", "19700101", frontal[0].StudyInstanceUID,
                       CALLING_AE):
        assert identifier.encode() not in served


def test_readyz_names_a_destination_failing_for_too_long(make_node: Any,
                                                         serving_artifact: Path) -> None:
    closed = free_port()  # nobody listens there
    node = make_node(metrics_port=free_port(), destinations=[f"GONE@127.0.0.1:{closed}"],
                     allow_unvalidated_models=True, evidence_image=False,
                     retry_base_seconds=30, ready_destination_failing_seconds=1)
    card.install(serving_artifact, node.settings.model_dir, allow_unvalidated=True)
    assert store(node, [chest_image()]) == [0]
    wait_until(lambda: verdict(node.settings.metrics_port, "/readyz")[0] == 503
               and failing(verdict(node.settings.metrics_port, "/readyz")[1])
               == {"destinations"}, timeout=60, what="the destination reported failing")
    _, ready = verdict(node.settings.metrics_port, "/readyz")
    assert f"dicom GONE@127.0.0.1:{closed} failing for" in \
        ready["checks"]["destinations"]["detail"]


@pytest.fixture
def probes(tmp_path: Path) -> Iterator[Probes]:
    settings = Settings(data_dir=tmp_path / "var", metrics_port=free_port(),
                        min_free_disk_mb=0)
    job_store = JobStore(settings.database_url)
    yield Probes(settings, job_store, Spool(settings.storage_dir), lambda: True,
                 {"worker": lambda: True})
    job_store.close()


def test_readyz_names_the_database_the_spool_and_the_disk(probes: Probes,
                                                          tmp_path: Path) -> None:
    status = StatusServer(probes)
    status.start()
    try:
        port = status.port
        assert verdict(port, "/readyz")[0] == 200
        # The disk: a minimum no disk here has.
        answer = StatusServer(replace(probes, settings=probes.settings.model_copy(
            update={"min_free_disk_mb": 2**40}))).readiness()
        assert failing(answer) == {"disk"}
        assert "minimum 1099511627776 MB" in answer["checks"]["disk"]["detail"]
        # The spool: the directory files are first written to (its only one yet) replaced
        # by a file, as on a volume gone wrong.
        [spool_tmp] = [p for p in probes.settings.storage_dir.iterdir() if p.is_dir()]
        spool_tmp.rmdir()
        spool_tmp.write_bytes(b"")
        code, answer = verdict(port, "/readyz")
        assert code == 503 and failing(answer) == {"spool"}, answer
        spool_tmp.unlink()
        spool_tmp.mkdir()
        # The database: its file gone, a directory in its place (an unmounted volume).
        probes.store.close()
        database = probes.settings.data_dir / "dicom-node.db"
        database.rename(tmp_path / "moved.db")
        database.mkdir()
        code, answer = verdict(port, "/readyz")
        assert code == 503 and failing(answer) == {"database", "destinations"}, answer
        assert answer["checks"]["destinations"]["detail"] == \
            "unknown: the database does not answer"
        # Only GET, and only these paths.
        assert get(port, "/readyz", method="POST")[0] == 405
        assert get(port, "/../etc/passwd")[0] == 404
    finally:
        status.stop()


def test_healthz_names_a_stopped_thread(make_node: Any) -> None:
    node = make_node(metrics_port=free_port())
    assert verdict(node.settings.metrics_port, "/healthz")[0] == 200
    node.worker.stop()
    node.worker.join(timeout=30)
    code, answer = verdict(node.settings.metrics_port, "/healthz")
    assert code == 503 and failing(answer) == {"worker"}


def test_a_status_port_in_use_stops_the_start_with_the_setting_named(make_node: Any) -> None:
    first = make_node(metrics_port=free_port())
    with pytest.raises(ConfigError, match="metrics_port"):
        make_node(metrics_port=first.settings.metrics_port, data_dir=first.settings.data_dir
                  .parent / "other")


def test_serve_has_the_endpoint_on_the_port_given(tmp_path: Path) -> None:
    port = free_port()
    node = NodeProcess(tmp_path / "var", extra_args=["--allow-calling-ae", CALLING_AE,
                                                     "--metrics-port", str(port)]).start()
    try:
        wait_until(lambda: _answers(port), timeout=30, what="the status endpoint")
        assert verdict(port, "/healthz")[0] == 200
        code, ready = verdict(port, "/readyz")
        assert code == 503 and failing(ready) == {"model"}  # none installed
    finally:
        assert node.stop() == 0
    assert "metrics and health on http://127.0.0.1:" in node.log


def _answers(port: int) -> bool:
    try:
        return get(port, "/healthz")[0] in (200, 503)
    except OSError:
        return False
