"""GuardMetrics: the fixed names, types and labels of docs/ARCHITECTURE.md, on an injected
registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from guard import __version__
from guard.metrics import GuardMetrics

EXPECTED = {
    "hguard_requests": ("counter", {"route", "status"}),
    "hguard_request_duration_seconds": ("histogram", {"route"}),
    "hguard_time_to_first_token_seconds": ("histogram", set()),
    "hguard_inter_token_latency_seconds": ("histogram", set()),
    "hguard_prompt_tokens": ("counter", set()),
    "hguard_generated_tokens": ("counter", set()),
    "hguard_scoring_seconds": ("histogram", set()),
    "hguard_answer_risk": ("histogram", set()),
    "hguard_decisions": ("counter", {"decision"}),
    "hguard_aborts": ("counter", set()),
    "hguard_queue_depth": ("gauge", set()),
    "hguard_requests_in_flight": ("gauge", set()),
    "hguard_batch_size": ("histogram", set()),
    "hguard_probe_validation_risk_quantile": ("gauge", {"quantile"}),
    "hguard_build_info": ("gauge", {"version", "model", "probe", "probe_sha256", "guarded"}),
}


def _exercise(metrics: GuardMetrics) -> None:
    metrics.requests.labels(route="/v1/completions", status="200").inc()
    metrics.request_duration.labels(route="/v1/completions").observe(0.1)
    metrics.probe_validation_risk_quantile.labels(quantile="0.5").set(0.4)
    metrics.set_build_info(model="m", probe="p", probe_sha256="abc", guarded=True)


def test_names_types_and_labels() -> None:
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    _exercise(metrics)
    found = {family.name: family for family in registry.collect()}
    for name, (kind, labels) in EXPECTED.items():
        assert name in found, name
        family = found[name]
        assert family.type == kind, name
        sample_labels = {key for s in family.samples for key in s.labels if key != "le"}
        assert sample_labels == labels, name


def test_values_are_readable_from_the_registry() -> None:
    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    assert registry.get_sample_value("hguard_decisions_total", {"decision": "abstain"}) == 0.0
    metrics.decisions.labels(decision="flag").inc()
    metrics.answer_risk.observe(0.42)
    metrics.set_validation_quantiles({"0.9": 0.8})
    metrics.set_build_info(model="m", probe="p", probe_sha256="abc", guarded=False)
    assert registry.get_sample_value("hguard_decisions_total", {"decision": "flag"}) == 1.0
    assert registry.get_sample_value("hguard_answer_risk_bucket", {"le": "0.4"}) == 0.0
    assert registry.get_sample_value("hguard_answer_risk_bucket", {"le": "0.45"}) == 1.0
    labels = {"quantile": "0.9"}
    assert registry.get_sample_value("hguard_probe_validation_risk_quantile", labels) == 0.8
    info = {
        "version": __version__,
        "model": "m",
        "probe": "p",
        "probe_sha256": "abc",
        "guarded": "false",
    }
    assert registry.get_sample_value("hguard_build_info", info) == 1.0


def test_registries_are_independent() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    GuardMetrics(first).aborts.inc()
    GuardMetrics(second)
    assert first.get_sample_value("hguard_aborts_total") == 1.0
    assert second.get_sample_value("hguard_aborts_total") == 0.0
