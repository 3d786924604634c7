"""Helpers of the hardening tests: Prometheus samples, OpenAI's error shape.

Servers (`hguard serve` as a subprocess, the app in a thread) are in `tests.fixtures.servers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def is_openai_error(body: Any) -> bool:
    """``{"error": {"message": str, "type": str, "param": str|None, "code": str|None}}``."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return False
    error = body["error"]
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and bool(error["message"].strip())
        and isinstance(error.get("type"), str)
        and all(isinstance(error.get(k), str | None) for k in ("param", "code"))
    )


def sample(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """One sample of the Prometheus text exposition, or None when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(s.value)
    return None
