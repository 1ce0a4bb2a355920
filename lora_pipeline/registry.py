"""Register a fine-tuned model in the MLflow Model Registry: transformers flavor, lineage, idempotent.

A pipeline run that is retried (same ``run_key``) gets back the version it registered the first
time instead of a duplicate; a retry after a failed upload or version creation leaves one stored copy
of the model (:mod:`lora_pipeline.logged_models`). The model is logged with the MLflow transformers flavor under the
``llm/v1/chat`` inference task: the pyfunc/serving signature takes OpenAI-style chat messages,
while ``mlflow.transformers.load_model`` returns a plain ``text-generation`` pipeline.

Two storage forms (version tag ``store``):

- ``merged``: the full merged model (self-contained; as large as the base).
- ``adapter``: MLflow's own PEFT form, logged with ``base_model_path``: only the LoRA adapter (``peft/``)
  and the tokenizer are stored, plus the base's absolute local directory (flavor key
  ``local_base_model_path``); ``mlflow.transformers.load_model`` loads that base and applies the adapter.
  Without ``base_model_path`` MLflow would reference the base by hub id and the *latest* hub commit
  (looked up online at logging time), and copy the full base weights for a local directory. An adapter
  trained on a quantised base references that base de-quantised (the pipeline passes ``base_model_dir``),
  so a plain MLflow load computes what was gated, without bitsandbytes.

MLflow's adapter form stores no generation config: a plain load gets the *base's* stop ids. So the
logged model's generation config (the full EOS set) is also kept in the MLmodel metadata, restored by
:func:`lora_pipeline.loading.load_text_generation`, and passed as ``model_config`` so MLflow's pyfunc serving stops there too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException

from lora_pipeline.logged_models import discard_logged_model, reusable_logged_model
from lora_pipeline.model_flavor import (
    MODEL_ARTIFACT_NAME,
    STORE_TAG,
    ModelSource,
    Store,
    load_components,
    model_source,
    upload_model,
)
from lora_pipeline.redaction import mask_secrets
from lora_pipeline.tracking import fluent_tracking_uri, log_artifacts, masked_tags, mlflow_client, set_tags

if TYPE_CHECKING:
    from lora_pipeline.config import RegistryConfig

logger = logging.getLogger(__name__)

ADAPTER_ARTIFACT_PATH = "adapter"
RUN_KEY_TAG = "run_key"


@dataclass(frozen=True)
class RegisteredVersion:
    """One model version in the registry.

    Attributes:
        name: Registered model name.
        version: Version number as MLflow returns it (a string).
        run_id: MLflow run that logged the model.
        model_uri: ``models:/NAME/VERSION``.
        created: False when an existing version for the same run key was returned.
    """

    name: str
    version: str
    run_id: str
    model_uri: str
    created: bool


def _filter_value(value: str, what: str) -> str:
    # MLflow's search grammar has no escape for quotes; refuse rather than build a broken filter.
    if "'" in value or "\\" in value:
        raise ValueError(f"{what} must not contain quotes or backslashes: {value!r}")
    return value


def find_version_by_run_key(tracking_uri: str, name: str, run_key: str) -> RegisteredVersion | None:
    """The (oldest) version of ``name`` tagged ``run_key``, if any.

    Args:
        tracking_uri: Tracking/registry store URI.
        name: Registered model name.
        run_key: Identity of the pipeline run (e.g. data hash + config hash).

    Returns:
        The version with ``created=False``, or None (also when the model is not registered yet).

    Raises:
        ValueError: ``name`` or ``run_key`` contains a quote.
    """
    query = (f"name = '{_filter_value(name, 'model name')}' "
             f"and tags.{RUN_KEY_TAG} = '{_filter_value(run_key, 'run_key')}'")
    versions = mlflow_client(tracking_uri).search_model_versions(query)
    if not versions:
        return None
    first = min(versions, key=lambda mv: int(mv.version))
    return RegisteredVersion(name=first.name, version=str(first.version), run_id=first.run_id or "",
                             model_uri=f"models:/{first.name}/{first.version}", created=False)


def _log_transformers_model(tracking_uri: str, run_id: str, source: ModelSource, input_example: Any,
                            lineage: dict[str, str], name: str, eos_token_ids: list[int] | None,
                            trust_remote_code: bool) -> tuple[str, bool]:
    """Log ``source`` with the transformers flavor into ``run_id``, or reuse this run key's complete upload.

    Returns:
        The logged model id, and whether this call uploaded it (False: an earlier attempt's READY model).
    """
    client = mlflow_client(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    identity = {RUN_KEY_TAG: lineage[RUN_KEY_TAG], STORE_TAG: lineage[STORE_TAG]}
    earlier = reusable_logged_model(tracking_uri, experiment_id, run_id, identity)
    if earlier is not None:
        logger.info("reusing logged model %s uploaded by an earlier attempt of run key %s", earlier.model_id,
                    identity[RUN_KEY_TAG])
        return earlier.model_id, False
    # Components, not the checkpoint path: MLflow 3.17's local-checkpoint path breaks on
    # transformers 5 (pipelines.check_task returns the pipeline class as a string).
    components = load_components(source, eos_token_ids, trust_remote_code)
    # Created here rather than by log_model, which would take the experiment from global state
    # (MLFLOW_EXPERIMENT_ID or the default experiment, whose artifacts go to ./mlruns).
    logged = client.create_logged_model(experiment_id, name=MODEL_ARTIFACT_NAME, source_run_id=run_id,
                                        tags=lineage)
    try:
        upload_model(tracking_uri, run_id, logged.model_id, components, source, input_example, name)
    except BaseException:
        # Nothing points at a partial upload (no version yet); its files must not stay behind either.
        discard_logged_model(tracking_uri, logged)
        raise
    return logged.model_id, True


def _ensure_registered_model(tracking_uri: str, name: str) -> None:
    client = mlflow_client(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def register_model(
    *,
    tracking_uri: str,
    run_id: str,
    registry_cfg: RegistryConfig,
    run_key: str,
    tags: Mapping[str, str],
    input_example: Any,
    model_dir: Path | None = None,
    adapter_dir: Path | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
    base_model_dir: Path | None = None,
    store: Store | None = None,
    eos_token_ids: Sequence[int] | None = None,
    description: str | None = None,
    trust_remote_code: bool = False,
) -> RegisteredVersion:
    """Log the model (transformers flavor) into the run and register it, once per run key.

    Args:
        tracking_uri: Tracking/registry store URI (the registry lives in the tracking store).
        run_id: Pipeline run that receives the model (and adapter) artifacts.
        registry_cfg: Registered model name, and the default ``store``.
        run_key: Identity of this pipeline run; a version already tagged with it is returned,
            whatever form it was stored in.
        tags: Lineage (data_hash, config_hash, base_model, flow_run_id, git_commit, metrics...);
            set, masked, on the model version, the logged model and the run, plus ``run_key``,
            ``store`` and, when given, ``base_model`` (and ``base_model_path`` for the adapter form).
        input_example: Prompt string, list of chat messages, or ``{"messages": [...], ...}``.
        model_dir: Merged Hugging Face model dir (needed by ``store="merged"``): safetensors
            weights, tokenizer with chat template, generation config.
        adapter_dir: LoRA adapter dir as training saves it (adapter + tokenizer; needed by
            ``store="adapter"``). Also logged as run artifact ``adapter`` (for serving on a shared
            base); its URI is added to the tags as ``adapter_uri``.
        base_model: The adapter's base (needed by ``store="adapter"``): a local model directory
            (a GGUF base: its converted directory), or a hub id cached locally (see
            :func:`lora_pipeline.base_model.resolve_base_dir`). The version references that directory: keep it in place.
        base_revision: Hub revision of a hub-id ``base_model``.
        base_model_dir: The directory the adapter form loads as its base, when not ``base_model`` itself:
            for an adapter trained on a quantised base, that base de-quantised
            (:func:`lora_pipeline.merge.save_dequantized_base`). Tagged as ``base_model_path``.
        store: ``"merged"`` or ``"adapter"``; None takes ``registry_cfg.store``.
        eos_token_ids: The full stop set; the logged model's ``generation_config.eos_token_id``
            becomes exactly this list. None keeps the model's (or base's) own generation config.
        description: The version's description in the MLflow UI (gate decision, run link), masked.
        trust_remote_code: ``model.trust_remote_code``: a model whose config names its own code
            (``auto_map``) is refused without it (:func:`lora_pipeline.modeling.refuse_unreviewed_remote_code`).

    Returns:
        The version; ``created`` tells whether this call created it.

    Raises:
        FileNotFoundError: the model dir, adapter dir or base is missing.
        RemoteCodeRefused: the model ships its own code and ``trust_remote_code`` is False.
        ValueError: the model name or run key contains a quote; ``store`` lacks its inputs;
            ``eos_token_ids`` is empty.
        MlflowException: the store refused an operation.
    """
    name = registry_cfg.model_name
    source = model_source(store or registry_cfg.store, model_dir, adapter_dir, base_model, base_revision,
                          base_model_dir)
    eos = [int(i) for i in eos_token_ids] if eos_token_ids is not None else None
    if eos is not None and not eos:
        raise ValueError("eos_token_ids must name at least one token id (or be None)")
    existing = find_version_by_run_key(tracking_uri, name, run_key)
    if existing is not None:
        logger.info("run_key %s already registered as %s", run_key, existing.model_uri)
        return existing
    lineage = masked_tags({**tags, RUN_KEY_TAG: run_key, **source.tags()})
    if adapter_dir is not None:
        log_artifacts(tracking_uri, run_id, Path(adapter_dir), ADAPTER_ARTIFACT_PATH)
        lineage["adapter_uri"] = f"runs:/{run_id}/{ADAPTER_ARTIFACT_PATH}"
    model_id, uploaded = _log_transformers_model(tracking_uri, run_id, source, input_example, lineage, name, eos,
                                                 trust_remote_code)
    # Logging takes seconds; checking again here shrinks the check-then-create window.
    existing = find_version_by_run_key(tracking_uri, name, run_key)
    if existing is not None:
        logger.info("run_key %s was registered meanwhile as %s", run_key, existing.model_uri)
        if uploaded:  # our copy is now unused (a reused one may be what the existing version points at)
            discard_logged_model(tracking_uri, mlflow_client(tracking_uri).get_logged_model(model_id))
        return existing
    _ensure_registered_model(tracking_uri, name)
    # Source "models:/<model_id>" links the version to its logged model (the SQL store keeps no
    # model_id column). That store resolves it through the *global* tracking URI (an MLflow TODO;
    # it would read ./mlflow.db of the working directory), hence the fluent context.
    with fluent_tracking_uri(tracking_uri):
        created = mlflow_client(tracking_uri).create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, tags=lineage, model_id=model_id,
            description=mask_secrets(description) if description else None,
        )
    # Two registrations of one run key can still both get here (the registry has no unique
    # constraint on tags). Both then see both versions; the oldest one wins everywhere, and the
    # process that created a newer one deletes it, so one run key ends with exactly one version.
    winner = find_version_by_run_key(tracking_uri, name, run_key)
    if winner is not None and winner.version != str(created.version):
        logger.warning("run_key %s was registered concurrently as %s: deleting duplicate version %s",
                       run_key, winner.model_uri, created.version)
        mlflow_client(tracking_uri).delete_model_version(name, str(created.version))
        if uploaded:
            discard_logged_model(tracking_uri, mlflow_client(tracking_uri).get_logged_model(model_id))
        return winner
    set_tags(tracking_uri, run_id, {**lineage, "registered_model_uri": f"models:/{name}/{created.version}"})
    return RegisteredVersion(name=name, version=str(created.version), run_id=run_id,
                             model_uri=f"models:/{name}/{created.version}", created=True)


def set_version_tags(tracking_uri: str, name: str, version: str, tags: Mapping[str, str],
                     description: str | None = None) -> None:
    """Set (masked) tags, and optionally the description, on one model version, e.g. the gate decision of a
    later run of the same training."""
    client = mlflow_client(tracking_uri)
    for key, value in masked_tags(tags).items():
        client.set_model_version_tag(name, version, key, value)
    if description is not None:
        client.update_model_version(name, version, description=mask_secrets(description))
