"""The promotion flow: move ``champion`` to a registered version, say who and why; serving follows."""

from __future__ import annotations

from prefect import flow, get_run_logger, runtime

from lora_pipeline.run_request import load_run_config
from tasks.registry import promote_version
from tasks.secrets import load_secrets


@flow(name="promote")
def promote(model_name: str, version: str, reason: str, force: bool = False, config_path: str | None = None) -> dict:
    """Make ``version`` of ``model_name`` the champion.

    Steps:
        1. promote_version - ``champion`` -> ``version``, the old champion -> ``previous``; the version is
                             tagged with who promoted it (this flow run) and why. A version that failed the
                             gate needs ``force``. Every ``lora-pipeline serve NAME@champion`` picks the new
                             version up within its ``--follow-seconds`` and swaps without dropping requests.

    Args:
        model_name: Registered model name.
        version: Version number to serve.
        reason: Why (kept on the version as ``promotion_reason``).
        force: Promote even a version whose gate failed.
        config_path: Config file whose ``mlflow.tracking_uri`` names the registry (under the worker's config
            roots; unset: ``MLFLOW_TRACKING_URI``, else the embedded default store).
    """
    load_secrets(load_run_config(config_path, None).secrets)  # registry credentials from Secret blocks
    result = promote_version(model_name, version, reason, force, config_path, by=f"flow run {runtime.flow_run.name}")
    get_run_logger().info("%s: champion is version %s (previous: %s)", model_name, result["champion"],
                          result["previous"])
    return result
