"""The promotion gate: a pure decision over metric dicts, with every reason spelled out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lora_pipeline.config import GateConfig


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_candidate(base: Mapping[str, float], candidate: Mapping[str, float], gate: GateConfig) -> GateDecision:
    """Pass only if the candidate gained enough on the task and did not forget the base's skills.

    Args:
        base: metrics of the base model (``task_exact_match``, ``regression_exact_match``).
        candidate: metrics of the fine-tuned model, same keys.
        gate: thresholds (``min_task_gain``, ``max_regression``).

    Returns:
        The decision and one human-readable reason per rule, passing or failing.
    """
    reasons: list[str] = []
    passed = True
    gain = candidate.get("task_exact_match", 0.0) - base.get("task_exact_match", 0.0)
    ok = gain >= gate.min_task_gain
    passed &= ok
    reasons.append(
        f"task gain {gain:+.3f} {'>=' if ok else '<'} min_task_gain {gate.min_task_gain:.3f}"
    )
    if "regression_exact_match" in base and "regression_exact_match" in candidate:
        drop = base["regression_exact_match"] - candidate["regression_exact_match"]
        ok = drop <= gate.max_regression
        passed &= ok
        reasons.append(
            f"regression drop {drop:+.3f} {'<=' if ok else '>'} max_regression {gate.max_regression:.3f}"
        )
    else:
        reasons.append("no regression suite: regression rule not applied")
    return GateDecision(passed=bool(passed), reasons=reasons)
