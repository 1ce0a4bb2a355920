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


def resolve_task_metric(gate: GateConfig, data_format: str) -> str:
    """``gate.task_metric``, defaulting to perplexity for text data (no answers to match) and exact match otherwise."""
    return gate.task_metric or ("perplexity" if data_format == "text" else "exact_match")


def gain(reference: Mapping[str, float], candidate: Mapping[str, float], key: str) -> float | None:
    """How much better ``candidate`` does than ``reference`` on metric ``key`` (None when a side lacks it).

    Rates (exact match, token F1, ROUGE-L): the difference. Perplexities (lower is better): the relative
    reduction ``1 - candidate / reference``.
    """
    if key not in reference or key not in candidate:
        return None
    if key.endswith("perplexity"):
        return 1.0 - candidate[key] / reference[key] if reference[key] > 0 else None
    return candidate[key] - reference[key]


def gate_candidate(
    base: Mapping[str, float],
    candidate: Mapping[str, float],
    gate: GateConfig,
    champion: Mapping[str, float] | None = None,
    task_metric: str = "exact_match",
) -> GateDecision:
    """Pass only if the candidate learned the task, kept the base's skills, stops, and beats the champion.

    Rules (each yields one reason, passing or failing):
        - task gain: :func:`gain` on ``task_<task_metric>`` >= ``gate.min_task_gain``;
        - regression: the drop on ``regression_<gate.regression_metric>`` (minus its :func:`gain`: a
          difference for rates, the relative increase for perplexity) <= ``gate.max_regression``;
        - stop rate: every suite's ``*_stop_rate`` of the candidate >= ``gate.min_stop_rate``;
        - champion (when there is one): the candidate's gain over the champion on both of those
          metrics >= -``gate.champion_tolerance``, on the same suites in the same run.

    Args:
        base: metrics of the base model (the quantised base the candidate was trained on, so that
            quantisation error is never counted as the candidate's forgetting).
        candidate: metrics of the fine-tuned model, same keys.
        gate: thresholds.
        champion: metrics of the model currently serving (``champion`` alias), if any and if it is
            not this same training.
        task_metric: see :func:`resolve_task_metric`.
    """
    reasons: list[str] = []
    passed = True
    task_key, regression_key = f"task_{task_metric}", f"regression_{gate.regression_metric}"
    task_gain = gain(base, candidate, task_key)
    if task_gain is None:
        passed &= _rule(reasons, False, f"{task_key}: not measured (no task suite scored)")
    else:
        passed &= _rule(reasons, task_gain >= gate.min_task_gain,
                        f"task gain ({task_metric}) {task_gain:+.3f} (need >= {gate.min_task_gain:.3f})")
    regression_gain = gain(base, candidate, regression_key)
    if regression_gain is None:
        reasons.append(f"SKIP: no {regression_key} (no regression suite), regression rule not applied")
    else:
        passed &= _rule(reasons, -regression_gain <= gate.max_regression,
                        f"regression drop ({gate.regression_metric}) {-regression_gain:+.3f} "
                        f"(allowed <= {gate.max_regression:.3f})")
    for key in sorted(k for k in candidate if k.endswith("_stop_rate")):
        passed &= _rule(reasons, candidate[key] >= gate.min_stop_rate,
                        f"{key} {candidate[key]:.3f} (need >= {gate.min_stop_rate:.3f})")
    if champion is None:
        reasons.append("SKIP: no champion to compare with (none yet, or it is this same training)")
    else:
        allowed = 0.0 - gate.champion_tolerance
        for key in (task_key, regression_key):
            delta = gain(champion, candidate, key)
            if delta is not None:
                passed &= _rule(reasons, delta >= allowed, f"{key} vs champion {delta:+.3f} (allowed >= {allowed:.3f})")
    return GateDecision(passed=bool(passed), reasons=reasons)
