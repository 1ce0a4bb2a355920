"""End to end: the Prefect flow on a tiny model and tiny data, from rows to a registered version.

A hung stage, transient and permanent failures, and a secret block's value: tests/reliability/
(test_hung_and_transient.py, test_secrets.py), on a Prefect API of their own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_pipeline.config_files import load_config
from lora_pipeline.loading import load_text_generation
from lora_pipeline.modeling import load_base_model
from lora_pipeline.run_request import as_worker
from tests.helpers.configs import write_jsonl, write_tiny_config
from tests.helpers.flows import NOTIFY, alert_webhook, run_flow

STAGES = ["resolve_assets", "validate_data", "format_prompts", "train_qlora", "evaluate", "gate", "merge", "register",
          "apply_aliases"]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """An ephemeral Prefect API on a temporary database, shared by this module's flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def alerts(prefect_api):
    """A webhook on loopback behind a saved Prefect notification block; runs name it with NOTIFY."""
    with alert_webhook() as received:
        yield received


def read_artifact(key: str) -> str:
    """The latest data of a flow-run artifact, as the Prefect UI shows it."""
    from prefect.artifacts import Artifact

    artifact = Artifact.get(key)
    assert artifact is not None, f"no artifact {key}"
    return artifact.data if isinstance(artifact.data, str) else json.dumps(artifact.data)


def read_events(name: str) -> list:
    """Events named ``name`` the Prefect server has stored (it persists them asynchronously: poll briefly)."""
    import asyncio
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    async def read():
        async with get_client() as client:
            response = await client.request("POST", "/events/filter", json={
                "filter": EventFilter(event=EventNameFilter(name=[name])).model_dump(mode="json"), "limit": 50})
            return response.json()["events"]

    deadline = time.monotonic() + 30
    while not (events := asyncio.run(read())) and time.monotonic() < deadline:
        time.sleep(1)
    return events


@pytest.fixture(scope="module")
def small_config(tiny_model_dir, tmp_path_factory) -> Path:
    """A config pointing at the tiny model and tiny data files, with a handful of training steps."""
    return write_tiny_config(tmp_path_factory.mktemp("e2e"), tiny_model_dir, "e2e-tiny", system_metrics_interval=0.5)


def test_flow_runs_every_stage_and_registers(prefect_api, small_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written relative to the working directory
    summary_path = tmp_path / "summary.json"
    result = run_flow(small_config, summary_json=summary_path)
    summary = json.loads(summary_path.read_text())
    assert summary == json.loads(json.dumps(result, default=str))
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert all(s["status"] == "completed" and s["seconds"] >= 0 for s in summary["stages"])
    assert summary["status"] == "completed" and summary["flow_run_id"]
    assert summary["train"]["global_step"] == 6
    assert {"task_exact_match", "regression_exact_match", "regression_perplexity", "task_stop_rate"} <= set(
        summary["eval"]["base"]) == set(summary["eval"]["candidate"])
    assert summary["gate"]["passed"] is True and summary["gate"]["reasons"]
    # The gate's base is the quantised base the candidate trained on; full precision is reported beside it.
    assert set(summary["eval"]["base_full_precision"]) == set(summary["eval"]["base"])
    assert set(summary["comparison"]["quantization_cost"]) == {
        "task_exact_match", "task_perplexity", "regression_exact_match", "regression_perplexity"}
    assert summary["registered_model"]["name"] == "e2e-tiny" and summary["registered_model"]["version"] == "1"
    assert summary["champion"] == {}  # nothing registered before this run
    assert summary["registry"] == {"aliases": {"candidate": "1", "champion": "1"}, "promoted": True}
    assert "SKIP: no champion to compare with (none yet, or it is this same training)" in summary["gate"]["reasons"]
    run_dir = Path(summary["run_dir"])
    for produced in ["data/clean.jsonl", "data/quarantine.jsonl", "formatted/tokenized.jsonl", "adapter",
                     "eval/base.json", "eval/candidate.json", "merged/model.safetensors", "summary.json",
                     "train/loss_curve.png", "eval/comparison.json", "eval/comparison.png"]:
        assert (run_dir / produced).exists(), produced
    assert list(tmp_path.iterdir()) == [summary_path]

    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert {"train/loss", "train/grad_norm", "train/learning_rate"} <= set(run.data.metrics)
    assert any(name.startswith("system/cpu_utilization") for name in run.data.metrics)  # sampled while training
    assert run.data.params["lora.r"] == "4"
    assert run.data.metrics["train_summary/trainable_params"] > 0 and run.data.metrics["train_summary/peak_memory_mb"] > 0
    assert "train/loss_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id, "train")}
    assert {"comparison.png", "comparison.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.tags["gate_passed"] == "True" and run.data.tags["gate_reasons"].startswith("PASS: task gain")
    version = client.get_model_version("e2e-tiny", "1")
    assert version.tags["gate_reasons"] == run.data.tags["gate_reasons"]
    assert len(version.tags["git_commit"].removesuffix("+dirty")) == 40  # this checkout's commit
    assert {"data_hash", "config_hash", "base_model", "flow_run_id"} <= set(version.tags)
    # The figures are the run's metrics; the version's description says how it was judged and links the run.
    assert not [key for key in version.tags if key.startswith("eval.")]
    assert "eval/candidate/task_exact_match" in run.data.metrics
    assert version.description.startswith("Gate PASSED. PASS: task gain") and run.info.run_id in version.description
    gate_report = read_artifact("gate-e2e-tiny")
    assert gate_report.startswith("# Gate PASSED: e2e-tiny") and "| task_exact_match |" in gate_report
    assert "task_exact_match" in read_artifact("gate-comparison-e2e-tiny")
    assert version.tags["store"] == "merged" and version.tags["base_fingerprint"].startswith("sha256:")

    outputs = run_dir.parents[1]
    pipe = load_text_generation(summary["registered_model"]["model_uri"], f"sqlite:///{outputs / 'mlflow.db'}")
    answer = pipe([{"role": "user", "content": "repeat red cat"}], max_new_tokens=6)
    assert isinstance(answer[0]["generated_text"], list)


def test_next_run_is_gated_against_the_champion_and_promoted(prefect_api, small_config, tmp_path, monkeypatch):
    """A second training (other seed: another run key) is compared with champion version 1."""
    monkeypatch.chdir(tmp_path)
    # Full tolerance: the tiny model's scores are noise, this test is about the wiring.
    summary = run_flow(small_config, "train.seed=1", "gate.champion_tolerance=1.0")
    assert summary["champion"]["version"] == "1"
    champion = summary["eval"]["champion"]
    assert set(champion) == set(summary["eval"]["candidate"])
    assert any(r.endswith("(allowed >= -1.000)") and "vs champion" in r for r in summary["gate"]["reasons"])
    table = json.loads((Path(summary["run_dir"]) / "eval" / "comparison.json").read_text())
    assert set(table["task_exact_match"]) == {"base", "base_full_precision", "candidate", "champion"}
    # Same base: the champion is scored as its adapter on this run's quantised base, like the candidate.
    assert summary["champion"]["scored_as"] == "its adapter on this run's quantised base"
    assert summary["gate"]["passed"] is True
    assert summary["registered_model"]["version"] == "2"
    assert summary["registry"]["aliases"] == {"candidate": "2", "champion": "2", "previous": "1"}


def test_bad_data_stops_the_run_before_training(prefect_api, alerts, small_config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\nnot json\n' * 20)
    summary_path = tmp_path / "summary.json"
    alerts.clear()
    with pytest.raises(Exception, match="data validation failed"):
        run_flow(small_config, f"data.path={bad}", NOTIFY, summary_json=summary_path)
    # The failure reached the notification block's webhook and was raised as a Prefect event.
    (message,) = alerts
    assert message["subject"] == "lora-pipeline: run for e2e-tiny failed in stage validate_data"
    assert "bad.jsonl" in message["body"]
    assert any(event["payload"]["stage"] == "validate_data" for event in read_events("lora-pipeline.run.failed"))
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "failed"
    assert [(s["name"], s["status"]) for s in summary["stages"]][-1] == ("validate_data", "failed")
    assert "train" not in summary and "bad.jsonl" in summary["error"]
    # The evidence reaches MLflow even though the run stopped: report, GX result, quarantine, Data Docs.
    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    logged = {artifact.path for artifact in client.list_artifacts(summary["mlflow_run_id"], "data")}
    assert {"data/report.json", "data/gx_validation_result.json", "data/quarantine.jsonl",
            "data/data_docs"} <= logged
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FAILED"


def test_a_failed_gate_registers_the_adapter_and_a_base_reference_without_merging(prefect_api, alerts, small_config,
                                                                                 tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    alerts.clear()
    summary = run_flow(small_config, "train.seed=2", "gate.min_task_gain=2.0", NOTIFY)
    assert summary["gate"]["passed"] is False
    # Rejection: told through the block and as an event, reported as a flow-run artifact and on the version.
    (message,) = alerts
    assert message["subject"] == "lora-pipeline: gate rejected a candidate for e2e-tiny"
    assert "FAIL: task gain" in message["body"]
    assert any(event["resource"]["prefect.resource.id"] == "lora-pipeline.model.e2e-tiny"
               for event in read_events("lora-pipeline.gate.rejected"))
    assert read_artifact("gate-e2e-tiny").startswith("# Gate REJECTED: e2e-tiny")
    stages = {s["name"]: s["status"] for s in summary["stages"]}
    assert stages["merge"] == "skipped" and not (Path(summary["run_dir"]) / "merged").exists()
    version = summary["registered_model"]["version"]
    client = MlflowClient(summary["mlflow_tracking_uri"])
    registered = client.get_model_version("e2e-tiny", version)
    tags = registered.tags
    assert (tags["store"], tags["gate_passed"]) == ("adapter", "False")
    assert registered.description.startswith("Gate REJECTED. FAIL: task gain")
    assert summary["registry"]["aliases"].get("candidate") != version  # no alias for a failing version
    pipe = load_text_generation(summary["registered_model"]["model_uri"], summary["mlflow_tracking_uri"])
    assert type(pipe.model).__name__ == "PeftModelForCausalLM"  # base + adapter, loaded by MLflow's PEFT support
    # Its base is the 4-bit base the adapter was trained on, de-quantised: not the original float32 weights.
    cfg = load_config(small_config, ["train.seed=2"])
    assert Path(tags["base_model_path"]).parent == cfg.output_dir.resolve() / "cache" / "dequantized-base"
    assert tags["base_model"] == cfg.model.name_or_path
    loaded = pipe.model.get_base_model().state_dict()
    trained_on = load_base_model(cfg.model, cfg.quant, torch.device("cpu")).dequantize().state_dict()
    original = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path).state_dict()
    weight = "model.layers.0.self_attn.q_proj.weight"
    wrapped = weight.replace(".weight", ".base_layer.weight")  # when LoRA targets the layer
    assert torch.equal(loaded.get(wrapped, loaded.get(weight)), trained_on[weight])
    assert not torch.equal(trained_on[weight], original[weight])


def test_changing_only_the_gate_reuses_the_trained_adapter_and_its_version(prefect_api, small_config, tmp_path,
                                                                          monkeypatch):
    """The run key covers what changes the adapter: a new gate, eval or registry setting trains nothing again."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    failed = run_flow(small_config, "train.seed=2", "gate.min_task_gain=2.0")
    summary = run_flow(small_config, "train.seed=2", "gate.min_task_gain=-1.0", "gate.champion_tolerance=1.0",
                       "eval.max_new_tokens=8")
    assert summary["run_key"] == failed["run_key"]
    assert summary["train"]["resumed_from_step"] == summary["train"]["global_step"]  # nothing trained again
    assert summary["registered_model"]["version"] == failed["registered_model"]["version"]
    assert summary["registered_model"]["created"] is False
    tags = MlflowClient(summary["mlflow_tracking_uri"]).get_model_version(
        "e2e-tiny", summary["registered_model"]["version"]).tags
    assert tags["gate_passed"] == "True" and tags["flow_run_id"] == summary["flow_run_id"]  # how it was last judged
    changed = run_flow(small_config, "train.seed=2", "lora.r=8", "gate.min_task_gain=-1.0",
                       "gate.champion_tolerance=1.0")
    assert changed["run_key"] != summary["run_key"]


def test_text_data_trains_without_a_template_and_gates_on_held_out_perplexity(prefect_api, small_config, tmp_path,
                                                                             monkeypatch):
    """data.format=text (continued pre-training): the task suite is the held-out texts' perplexity."""
    from tests.conftest import ANIMALS, COLOURS

    monkeypatch.chdir(tmp_path)
    texts = [{"text": f"the {c} {a} sees the {c2} {a2}"} for c in COLOURS for a in ANIMALS for c2, a2 in
             zip(COLOURS[:2], ANIMALS[1:3], strict=True)]
    source = Path(write_jsonl(tmp_path / "texts.jsonl", texts))
    summary = run_flow(small_config, f"data.path={source}", "data.format=text", "data.eval_path=null",
                       "data.eval_fraction=0.2", "train.learning_rate=1e-2", "registry.model_name=e2e-text",
                       "gate.min_task_gain=0.05")
    assert summary["status"] == "completed"
    assert 0 < summary["data"]["n_held_out"] < len(texts)
    base, candidate = summary["eval"]["base"], summary["eval"]["candidate"]
    assert "task_exact_match" not in candidate  # no answers to match in text data
    assert candidate["task_perplexity"] < base["task_perplexity"]  # it learned the held-out texts' language
    assert summary["gate"]["reasons"][0].startswith("PASS: task gain (perplexity)")
    assert summary["gate"]["passed"] is True and summary["registered_model"]["version"] == "1"


def test_a_run_form_can_change_only_the_allowed_settings(prefect_api, small_config, tmp_path, monkeypatch):
    """What a Prefect UI or API run may set: typed, validated, and never a place to write or code to run."""
    from flows.finetune import finetune
    from prefect.exceptions import ParameterTypeError

    from lora_pipeline.run_request import CONFIG_ROOTS_ENV, RunOverrides

    monkeypatch.chdir(tmp_path)
    for refused in ({"model_trust_remote_code": True}, {"output_dir": "/tmp/x"},
                    {"mlflow_tracking_uri": "http://evil"}, {"summary_json": "/etc/passwd"}):
        with pytest.raises((ParameterTypeError, ValueError), match="a run cannot set"):
            finetune(config_path=str(small_config), overrides=refused)
    # A config file outside the worker's config roots is refused before anything runs.
    monkeypatch.delenv(CONFIG_ROOTS_ENV, raising=False)
    with pytest.raises(Exception, match="a run may only read config files under"):
        finetune(config_path=str(small_config), overrides=RunOverrides(train_max_steps=2))
    # Allowed: typed settings on a config the worker lets runs read.
    monkeypatch.setenv(CONFIG_ROOTS_ENV, str(small_config.parent))
    summary = finetune(config_path=str(small_config), overrides={"train_max_steps": 3, "registry_model_name": "e2e-form",
                                                                   "lora_r": 2})
    assert summary["train"]["global_step"] == 3 and summary["registered_model"]["name"] == "e2e-form"


def test_the_promote_flow_moves_the_champion_and_records_who_and_why(prefect_api, small_config):
    """Runs after the flows above (versions 1 and 2 of e2e-tiny exist)."""
    from flows.promote import promote
    from mlflow import MlflowClient

    from lora_pipeline.promotion import PromotionError, version_by_alias
    from lora_pipeline.registry import set_version_tags

    uri = f"sqlite:///{small_config.parent / 'outputs' / 'mlflow.db'}"
    champion = version_by_alias(uri, "e2e-tiny", "champion")
    with as_worker(small_config):  # the worker may read the config that names the registry
        result = promote(model_name="e2e-tiny", version="1", reason="back to the first candidate",
                         config_path=str(small_config))
        assert result == {"champion": "1", "previous": None if champion == "1" else champion}
        set_version_tags(uri, "e2e-tiny", "2", {"gate_passed": "False", "gate_reasons": "FAIL: task gain"})
        with pytest.raises(PromotionError, match="failed the gate"):
            promote(model_name="e2e-tiny", version="2", reason="no", config_path=str(small_config))
        assert promote(model_name="e2e-tiny", version="2", reason="forced", force=True,
                       config_path=str(small_config))["champion"] == "2"
    tags = MlflowClient(uri, registry_uri=uri).get_model_version("e2e-tiny", "1").tags
    assert tags["promotion_reason"] == "back to the first candidate" and tags["promoted_by"].startswith("flow run ")


def test_a_flow_retry_takes_finished_stages_from_cache_and_runs_only_what_failed(prefect_api, small_config,
                                                                                 monkeypatch):
    """`register` fails once (a permanent error: no task retry), the flow run is retried: every stage that had
    finished comes back Cached, its side effects are not repeated, only registration runs again."""
    from collections import Counter

    from flows.finetune import finetune
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from lora_pipeline import evaluate_records, stages

    calls: Counter[str] = Counter()

    def counted(module, name, fail_first=False):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            if fail_first and calls[name] == 1:
                raise RuntimeError("the registry refused the version (permanent)")
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for name in ("validate_data", "format_prompts", "train", "merge"):
        counted(stages, name)
    counted(evaluate_records, "evaluate")
    counted(stages, "register", fail_first=True)
    with as_worker(small_config, ["train.seed=5", "registry.model_name=e2e-retry"]):
        summary = finetune.with_options(retries=1, retry_delay_seconds=0)(config_path=str(small_config))
    assert summary["status"] == "completed" and summary["registered_model"]["created"] is True
    assert calls == {"validate_data": 1, "format_prompts": 1, "train": 1, "evaluate": 3, "merge": 1, "register": 2}

    async def task_runs():
        async with get_client() as client:
            flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[summary["flow_run_id"]]))
            return await client.read_task_runs(flow_run_filter=flow_filter)

    import asyncio

    runs = [(run.name, run.state.name) for run in asyncio.run(task_runs())]
    for stage in ("validate_data", "format_prompts", "train_qlora", "evaluate-base", "evaluate-candidate", "merge"):
        # Task run names: "<task>-<3 hex>" or the task_run_name given ("evaluate-base").
        of_stage = [state for name, state in runs if name == stage or name.rsplit("-", 1)[0] == stage]
        assert "Cached" in of_stage, (stage, runs)
    register_states = [state for name, state in runs if name.startswith("register-")]
    assert register_states.count("Failed") == 1 and register_states.count("Completed") == 1


def test_the_evaluate_flow_rescores_a_version_against_the_champion_and_tags_the_decision(prefect_api, small_config):
    """Runs after the flows above: e2e-tiny has versions 1 (merged) and 2, one of them champion."""
    from flows.evaluate import evaluate_version
    from mlflow import MlflowClient

    from lora_pipeline.promotion import version_by_alias

    uri = f"sqlite:///{small_config.parent / 'outputs' / 'mlflow.db'}"
    champion = version_by_alias(uri, "e2e-tiny", "champion")
    challenger = "1" if champion != "1" else "2"
    with as_worker(small_config, ["gate.min_task_gain=-1.0", "gate.champion_tolerance=1.0"]):
        summary = evaluate_version(model_name="e2e-tiny", version=challenger, config_path=str(small_config))
    assert summary["status"] == "completed" and summary["champion"] == champion
    assert set(summary["eval"]) == {"base", f"v{challenger}", "champion"}
    assert set(summary["eval"][f"v{challenger}"]) == set(summary["eval"]["champion"])
    assert any("vs champion" in reason for reason in summary["gate"]["reasons"])
    tags = MlflowClient(uri, registry_uri=uri).get_model_version("e2e-tiny", challenger).tags
    assert tags["rescore_vs_champion"] == champion and tags["rescore_gate_passed"] == str(summary["gate"]["passed"])
    assert tags["rescore_mlflow_run_id"] == summary["mlflow_run_id"]
    assert version_by_alias(uri, "e2e-tiny", "champion") == champion  # judging is not promoting
    assert read_artifact("rescore-e2e-tiny").startswith(f"# Gate {'PASSED' if summary['gate']['passed'] else 'REJECTED'}"
                                                        f": e2e-tiny version {challenger}")
    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    assert f"eval/v{challenger}/task_exact_match" in run.data.metrics


def _steps(summary: dict) -> dict[str, dict]:
    """``{stage: {"status", "steps": {step: reused from or None}}}`` of a run summary."""
    return {s["name"]: {"status": s["status"], "steps": {k: v["reused_from"] for k, v in s.get("steps", {}).items()}}
            for s in summary["stages"]}


def _computed_in(summary: dict, stage: str) -> dict[str, str]:
    """``{step: run directory that computed its result}`` (this run's, or the one it was reused from)."""
    return {step: origin or summary["run_dir"] for step, origin in _steps(summary)[stage]["steps"].items()}


@pytest.mark.slow
def test_a_rerun_reuses_what_has_the_same_inputs_and_recomputes_what_changed(prefect_api, small_config, tmp_path,
                                                                             monkeypatch):
    """Identical re-run: every computing stage comes from the first run's records (status ``cached``, no
    compute seconds), the outputs are in the new run's own directory, no second version, aliases unchanged.
    One changed input (learning rate, a data row, the champion, a record's file) recomputes what reads it."""
    from mlflow import MlflowClient

    from lora_pipeline.promotion import promote

    monkeypatch.chdir(tmp_path)
    name, computing = "e2e-rerun", ("validate_data", "format_prompts", "train_qlora", "evaluate", "merge")
    args = ("train.seed=7", f"registry.model_name={name}")
    first = run_flow(small_config, *args)
    again = run_flow(small_config, *args)
    stages = _steps(again)
    assert {stage: stages[stage]["status"] for stage in computing} == dict.fromkeys(computing, "cached")
    assert all(stage.get("compute_seconds", 0.0) == 0.0 for stage in again["stages"])
    # Reused from the first run (or where the first run had its base's scores from: another test's run) ...
    assert _computed_in(again, "evaluate") == _computed_in(first, "evaluate")
    assert set(_computed_in(again, "evaluate")) == {"evaluate-base", "evaluate-base_full_precision",
                                                     "evaluate-candidate"}
    assert _computed_in(again, "train_qlora") == {"train_qlora": first["run_dir"]}
    run_dir = Path(again["run_dir"])
    assert run_dir != Path(first["run_dir"]) and again["registered_model"]["model_uri"].endswith("/1")
    for output in ("data/clean.jsonl", "formatted/tokenized.jsonl", "adapter/adapter_model.safetensors",
                   "eval/candidate.json", "merged/model.safetensors"):  # ... into its own directory
        assert (run_dir / output).read_bytes() == (Path(first["run_dir"]) / output).read_bytes(), output
    assert again["merge"]["merged_dir"] == str(run_dir / "merged")
    assert (again["eval"], again["gate"], again["run_key"]) == (first["eval"], first["gate"], first["run_key"])
    assert again["registered_model"] == {**first["registered_model"], "created": False}
    assert again["registry"]["aliases"] == first["registry"]["aliases"] == {"candidate": "1", "champion": "1"}
    client = MlflowClient(again["mlflow_tracking_uri"])
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert client.get_run(again["mlflow_run_id"]).data.tags["reused_stages"] == ", ".join(computing)

    # A learning rate: data stages reused, training and everything after it again; the base's scores kept.
    hold = (*args, "registry.auto_promote=false")  # version 1 stays champion from here on
    faster = run_flow(small_config, *hold, "train.learning_rate=0.003")
    stages = _steps(faster)
    assert (stages["validate_data"]["status"], stages["format_prompts"]["status"]) == ("cached", "cached")
    assert stages["train_qlora"] == {"status": "completed", "steps": {"train_qlora": None}}
    assert _computed_in(faster, "evaluate") == {**_computed_in(first, "evaluate"),
                                                "evaluate-candidate": faster["run_dir"],
                                                "evaluate-champion": faster["run_dir"]}
    assert faster["registered_model"]["version"] == "2" and faster["champion"]["version"] == "1"

    # One data row fewer: the data stages and training again; the champion's scores (same version, same
    # rows) are the learning-rate run's.
    rows = Path(small_config.parent / "train.jsonl").read_text().splitlines(keepends=True)
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(rows[:-1]))
    changed = run_flow(small_config, *hold, f"data.path={fewer}")
    stages = _steps(changed)
    assert [stages[s]["status"] for s in computing[:3]] == ["completed"] * 3
    assert stages["evaluate"]["steps"]["evaluate-candidate"] is None
    assert stages["evaluate"]["steps"]["evaluate-champion"] == faster["run_dir"]
    assert changed["run_key"] not in (first["run_key"], faster["run_key"])

    # Another champion: only its evaluation (and what follows the gate) runs again.
    promote(changed["mlflow_tracking_uri"], name, "2", force=True)
    rejudged = run_flow(small_config, *hold, f"data.path={fewer}")
    stages = _steps(rejudged)
    assert stages["evaluate"]["steps"]["evaluate-champion"] is None and rejudged["champion"]["version"] == "2"
    assert [stages[s]["status"] for s in computing[:3]] == ["cached"] * 3
    assert rejudged["registered_model"] == {**changed["registered_model"], "created": False}

    # A record whose file is gone is not used: training is taken from its finished checkpoint instead (no
    # model trained again), and the record is written anew.
    records = small_config.parent / "outputs" / "cache" / "stages" / "train_qlora"
    (record,) = [p.parent for p in records.glob("*/record.json")
                 if json.loads(p.read_text())["origin"] == first["run_dir"]]
    (record / "files" / "adapter" / "adapter_model.safetensors").unlink()
    repaired = run_flow(small_config, *args)
    stages = _steps(repaired)
    assert stages["train_qlora"] == {"status": "completed", "steps": {"train_qlora": None}}
    assert repaired["train"]["resumed_from_step"] == repaired["train"]["global_step"]
    assert json.loads((record / "record.json").read_text())["origin"] == repaired["run_dir"]
    assert repaired["registered_model"] == {**first["registered_model"], "created": False}
