"""The run summary: each stage's status and duration plus the figures a person checks after a run.

A stage record: ``name``, ``status`` (``completed``, ``cached`` when every step of it was reused from an
earlier run's record, ``failed``, ``skipped``), ``seconds`` (wall time) and, for the stages that compute,
``compute_seconds`` (their math: training steps, generation and scoring, merge and parity logits) and
``steps`` (how each step's result was obtained: its compute seconds, or the run it was reused from).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_pipeline.redaction import mask_secrets
from lora_pipeline.reuse import EXECUTION


def run_dir_for(output_dir: Path, flow_run_id: str, started: datetime) -> Path:
    """The directory of one flow run: ``<output_dir>/runs/<UTC start>-<flow run id prefix>``.

    A retry of the flow run (same id and scheduled start) gets the same directory back, so the stages it
    takes from cache find their outputs where they left them; another flow run never shares it.
    """
    stamp = started.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = output_dir / "runs" / f"{stamp}-{flow_run_id[:8]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@dataclass
class RunSummary:
    """Accumulates stage outcomes; ``write`` saves it as JSON (also when the run fails)."""

    flow_run_id: str
    run_dir: str
    status: str = "running"
    stages: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: When the flow began (Unix time): with the summary file's time, what the benchmarks split a run's wall time by.
    started_at: float = field(default_factory=time.time)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one stage and record ``completed`` or ``failed`` (with the error), re-raising failures."""
        record: dict[str, Any] = {"name": name, "status": "running", "seconds": None}
        self.stages.append(record)
        started = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            record["status"] = "failed"
            self.status = "failed"
            self.error = mask_secrets(f"{name}: {type(exc).__name__}: {exc}")
            raise
        else:
            steps = record.get("steps", {})
            reused = bool(steps) and all(step["reused_from"] for step in steps.values())
            record["status"] = "cached" if reused else "completed"
        finally:
            record["seconds"] = round(time.perf_counter() - started, 2)

    def note(self, result: Any, step: str | None = None) -> None:
        """Inside :meth:`stage`: how one of its steps got its result (the ``execution`` the stages return).

        Args:
            result: A stage result; one without ``execution`` (None, a metric dict) is not a step.
            step: Its name in the record (default: the stage's), e.g. ``evaluate-base``.
        """
        how = result.get(EXECUTION) if isinstance(result, dict) else None
        running = next((stage for stage in reversed(self.stages) if stage["status"] == "running"), None)
        if how is None or running is None:
            return
        steps = running.setdefault("steps", {})
        steps[step or running["name"]] = how
        running["compute_seconds"] = round(sum(s["compute_seconds"] for s in steps.values()), 3)

    def cached_stages(self) -> list[str]:
        """The stages whose every step was reused from an earlier run (status ``cached``)."""
        return [stage["name"] for stage in self.stages if stage["status"] == "cached"]

    @property
    def failed_stage(self) -> str | None:
        """The stage that failed, if one did."""
        return next((stage["name"] for stage in self.stages if stage["status"] == "failed"), None)

    def skip(self, name: str, why: str) -> None:
        """Record a stage that did not need to run (e.g. no merge for an adapter-only registration)."""
        self.stages.append({"name": name, "status": "skipped", "seconds": 0.0, "why": why})

    def to_dict(self) -> dict[str, Any]:
        return {
            "flow_run_id": self.flow_run_id,
            "run_dir": self.run_dir,
            "status": self.status,
            "error": self.error,
            "started_at": self.started_at,
            "stages": self.stages,
            **self.results,
        }

    def write(self, *paths: Path | str | None) -> None:
        """Write the summary JSON to every given path (``None`` entries are skipped)."""
        text = json.dumps(self.to_dict(), indent=2, default=str)
        for path in paths:
            if path is None:
                continue
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)


def lineage_tags(*, run_key: str, config_hash: str, data_hash: str, base_model: str, base_revision: str | None,
                 base_fingerprint: str, flow_run_id: str, git_commit: str, gate: dict[str, Any],
                 store: str) -> dict[str, str]:
    """The tags a registered version carries: where it came from, how it was judged, how it is stored.

    The evaluation figures are not tags: they are the run's metrics (:func:`final_metrics`), and the
    version's description (:func:`lora_pipeline.reports.version_description`) names the headline ones.
    """
    return {
        "run_key": run_key, "config_hash": config_hash, "data_hash": data_hash, "base_model": base_model,
        "base_model_revision": base_revision or "", "base_fingerprint": base_fingerprint,
        "flow_run_id": flow_run_id, "git_commit": git_commit, "gate_passed": str(gate["passed"]),
        "gate_reasons": "; ".join(gate["reasons"]), "store": store,
    }


def final_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The run's headline figures as flat MLflow metrics (evaluations, training totals, merge parity, gate)."""
    metrics = {f"eval/{label}/{k}": float(v) for label, m in results["eval"].items() for k, v in m.items()}
    # Training totals (trainable parameters and ratio, peak memory, tokens/s, resumed-from step).
    metrics.update({f"train_summary/{k}": float(v) for k, v in results["train"].items()})
    for key in ("merge_rel_diff", "quantized_rel_diff"):
        if key in results.get("merge", {}):
            metrics[f"merge/{key}"] = float(results["merge"][key])
    metrics["gate/passed"] = float(results["gate"]["passed"])
    return metrics


def code_version(source_dir: Path | None = None) -> str:
    """Git commit of the pipeline's source (``+dirty`` with uncommitted changes); ``unknown`` outside git.

    Recorded as the ``git_commit`` lineage tag, so a model version names the code that trained it. Where
    the source is not a git checkout (a container image), ``LORA_PIPELINE_GIT_COMMIT`` names it.
    """
    import os
    import subprocess

    where = str(source_dir or Path(__file__).resolve().parents[1])
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LORA_PIPELINE_GIT_COMMIT") or "unknown"
    return f"{commit}+dirty" if dirty else commit
