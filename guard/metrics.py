"""GuardMetrics: every Prometheus metric of the guard, registered on an injected registry.

Names, types and labels are fixed by docs/ARCHITECTURE.md (dashboards, alerts and the
autoscaler read them); add metrics, never rename these.

    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    metrics.decisions.labels(decision="flag").inc()
    registry.get_sample_value("hguard_decisions_total", {"decision": "flag"})  # 1.0
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from guard import __version__
from guard.results import GenerationResult, ScoreResult

RISK_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 wide, up to 1.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SCORING_BUCKETS = (1e-6, 1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class GuardMetrics:
    """The guard's metrics on one registry (a fresh `CollectorRegistry` per app or test)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "hguard_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "hguard_request_duration_seconds",
            "HTTP request duration",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "hguard_time_to_first_token_seconds",
            "time from arrival to the first token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "hguard_inter_token_latency_seconds",
            "time between two tokens of one answer",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "hguard_prompt_tokens", "prompt tokens processed", registry=registry
        )
        self.generated_tokens = Counter(
            "hguard_generated_tokens", "response tokens generated", registry=registry
        )
        self.scoring_seconds = Histogram(
            "hguard_scoring_seconds",
            "guard work (capture read-out, risk) per generated token",
            buckets=SCORING_BUCKETS,
            registry=registry,
        )
        self.answer_risk = Histogram(
            "hguard_answer_risk",
            "calibrated risk of finished answers",
            buckets=RISK_BUCKETS,
            registry=registry,
        )
        self.decisions = Counter(
            "hguard_decisions", "answers by decision", ["decision"], registry=registry
        )
        self.aborts = Counter("hguard_aborts", "streams aborted mid-answer", registry=registry)
        self.abstained_before_generation = Counter(
            "hguard_abstained_before_generation",
            "requests abstained on the knowledge gate's prompt risk alone, nothing generated",
            registry=registry,
        )
        self.out_of_scope = Counter(
            "hguard_out_of_scope",
            "answers to prompts the scope gate left unjudged (decision pass)",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "hguard_queue_depth", "requests waiting for a batch slot", registry=registry
        )
        self.requests_in_flight = Gauge(
            "hguard_requests_in_flight", "HTTP requests being served", registry=registry
        )
        self.batch_size = Histogram(
            "hguard_batch_size",
            "rows decoding together right after requests joined the running batch (per join)",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.probe_validation_risk_quantile = Gauge(
            "hguard_probe_validation_risk_quantile",
            "risk quantiles on the probe's validation split (drift reference)",
            ["quantile"],
            registry=registry,
        )
        self.build_info = Gauge(
            "hguard_build_info",
            "build and configuration of this replica",
            ["version", "model", "probe", "probe_sha256", "guarded"],
            registry=registry,
        )
        for decision in ("pass", "flag", "abstain"):
            self.decisions.labels(decision=decision)  # export zeros from the start

    def observe_verdict(self, result: ScoreResult) -> None:
        """Count one finished answer or score: decision, risk, abort, scope."""
        self.decisions.labels(decision=result.decision.value).inc()
        if result.risk is not None:
            self.answer_risk.observe(result.risk)
        if result.aborted:
            self.aborts.inc()
        if isinstance(result, GenerationResult) and result.before_generation:
            self.abstained_before_generation.inc()
        if not result.in_scope:
            self.out_of_scope.inc()

    def set_build_info(self, *, model: str, probe: str, probe_sha256: str, guarded: bool) -> None:
        """``hguard_build_info{...} 1`` for this replica."""
        self.build_info.labels(
            version=__version__,
            model=model,
            probe=probe,
            probe_sha256=probe_sha256,
            guarded=str(guarded).lower(),
        ).set(1)

    def set_validation_quantiles(self, quantiles: Mapping[str, float]) -> None:
        """The probe manifest's validation risk quantiles (e.g. ``{"0.5": 0.71}``)."""
        for quantile, value in quantiles.items():
            self.probe_validation_risk_quantile.labels(quantile=str(quantile)).set(value)
