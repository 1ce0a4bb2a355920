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


def _rule(reasons: list[str], ok: bool, text: str) -> bool:
    reasons.append(f"{'PASS' if ok else 'FAIL'}: {text}")
    return ok


def gate_candidate(
    base: Mapping[str, float],
    candidate: Mapping[str, float],
    gate: GateConfig,
    champion: Mapping[str, float] | None = None,
) -> GateDecision:
    """Pass only if the candidate learned the task, kept the base's skills, stops, and beats the champion.

    Rules (each yields one reason, passing or failing):
        - task gain: candidate ``task_exact_match`` - base >= ``gate.min_task_gain``;
        - regression: base ``regression_exact_match`` - candidate <= ``gate.max_regression``;
        - stop rate: every suite's ``*_stop_rate`` of the candidate >= ``gate.min_stop_rate``;
        - champion (when there is one): candidate task and regression exact match each >= the
          champion's - ``gate.champion_tolerance``, on the same suites in the same run.

    Args:
        base: metrics of the base model.
        candidate: metrics of the fine-tuned model, same keys.
        gate: thresholds.
        champion: metrics of the model currently serving (``champion`` alias), if any and if it is
            not this same training.
    """
    reasons: list[str] = []
    passed = True
    gain = candidate.get("task_exact_match", 0.0) - base.get("task_exact_match", 0.0)
    passed &= _rule(reasons, gain >= gate.min_task_gain,
                    f"task gain {gain:+.3f} (need >= {gate.min_task_gain:.3f})")
    if "regression_exact_match" in base and "regression_exact_match" in candidate:
        drop = base["regression_exact_match"] - candidate["regression_exact_match"]
        passed &= _rule(reasons, drop <= gate.max_regression,
                        f"regression drop {drop:+.3f} (allowed <= {gate.max_regression:.3f})")
    else:
        reasons.append("SKIP: no regression suite, regression rule not applied")
    for key in sorted(k for k in candidate if k.endswith("_stop_rate")):
        passed &= _rule(reasons, candidate[key] >= gate.min_stop_rate,
                        f"{key} {candidate[key]:.3f} (need >= {gate.min_stop_rate:.3f})")
    if champion is None:
        reasons.append("SKIP: no champion to compare with (none yet, or it is this same training)")
    else:
        for key in ("task_exact_match", "regression_exact_match"):
            if key in champion and key in candidate:
                delta = candidate[key] - champion[key]
                passed &= _rule(reasons, delta >= -gate.champion_tolerance,
                                f"{key} vs champion {delta:+.3f} (allowed >= {0.0 - gate.champion_tolerance:.3f})")
    return GateDecision(passed=bool(passed), reasons=reasons)
