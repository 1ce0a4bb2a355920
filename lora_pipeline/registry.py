"""Register the merged model in the MLflow Model Registry: transformers flavor, lineage, idempotent.

A pipeline run that is retried (same ``run_key``) gets back the version it registered the first
time instead of a duplicate. The model is logged with the MLflow transformers flavor under the
``llm/v1/chat`` inference task: the pyfunc/serving signature takes OpenAI-style chat messages,
while ``mlflow.transformers.load_model`` returns a plain ``text-generation`` pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException
from packaging.version import Version

from lora_pipeline.tracking import fluent_tracking_uri, log_artifacts, masked_tags, mlflow_client, set_tags

if TYPE_CHECKING:
    from transformers import Pipeline

    from lora_pipeline.config import RegistryConfig

logger = logging.getLogger(__name__)

#: Inference task recorded in the MLmodel: chat-messages signature, HF task "text-generation".
INFERENCE_TASK = "llm/v1/chat"
MODEL_ARTIFACT_NAME = "model"
ADAPTER_ARTIFACT_PATH = "adapter"
RUN_KEY_TAG = "run_key"
#: Pinned into the model's requirements.txt (MLflow adds itself). Explicit because MLflow's
#: inference imports every installed integration and fails without torchvision.
_REQUIREMENTS = ("torch", "transformers", "accelerate", "safetensors", "tokenizers")
_EXAMPLE_MAX_TOKENS = 8


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


def pip_requirements() -> list[str]:
    """Exact versions of the installed inference stack (local tags like ``+cpu`` dropped).

    Returns:
        e.g. ``["torch==2.13.0", "transformers==5.23.0", ...]``; packages not installed are skipped.
    """
    pins = []
    for package in _REQUIREMENTS:
        try:
            pins.append(f"{package}=={Version(version(package)).public}")
        except PackageNotFoundError:
            continue
    return pins


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


def _chat_example(input_example: Any) -> dict[str, Any]:
    """Normalise a prompt, a message list or a chat request to an ``llm/v1/chat`` request."""
    if isinstance(input_example, str):
        return {"messages": [{"role": "user", "content": input_example}], "max_tokens": _EXAMPLE_MAX_TOKENS}
    if isinstance(input_example, list):
        return {"messages": input_example, "max_tokens": _EXAMPLE_MAX_TOKENS}
    if isinstance(input_example, Mapping) and "messages" in input_example:
        return {"max_tokens": _EXAMPLE_MAX_TOKENS, **input_example}
    raise TypeError("input_example must be a prompt string, a list of chat messages or a dict with 'messages'")


def _model_card(model_dir: Path, name: str) -> Any:
    """The checkpoint's own card (README.md) if it has one, else a minimal local card.

    Given a card, MLflow does not try to fetch one from the Hub for the (local) model path, which
    only produces warnings offline.
    """
    from huggingface_hub import ModelCard

    readme = model_dir / "README.md"
    if readme.is_file():
        return ModelCard.load(readme)
    return ModelCard(f"---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n# {name}\n\n"
                     "Fine-tuned by lora-pipeline. Lineage: see the model version tags.\n")


def _log_transformers_model(tracking_uri: str, run_id: str, model_dir: Path, input_example: Any,
                            lineage: dict[str, str], name: str) -> str:
    """Log ``model_dir`` with the transformers flavor into ``run_id``; returns the logged model id."""
    import mlflow.transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Components, not the checkpoint path: MLflow 3.17's local-checkpoint path breaks on
    # transformers 5 (pipelines.check_task returns the pipeline class as a string).
    components = {
        "model": AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto"),
        "tokenizer": AutoTokenizer.from_pretrained(model_dir),
    }
    client = mlflow_client(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    # Created here rather than by log_model, which would take the experiment from global state
    # (MLFLOW_EXPERIMENT_ID or the default experiment, whose artifacts go to ./mlruns).
    logged = client.create_logged_model(experiment_id, name=MODEL_ARTIFACT_NAME, source_run_id=run_id,
                                        tags=lineage)
    with fluent_tracking_uri(tracking_uri):
        mlflow.transformers.log_model(
            transformers_model=components,
            name=MODEL_ARTIFACT_NAME,
            task=INFERENCE_TASK,  # signature is then fixed by MLflow (chat request/response)
            input_example=_chat_example(input_example),
            pip_requirements=pip_requirements(),
            model_card=_model_card(model_dir, name),
            run_id=run_id,
            model_id=logged.model_id,
        )
    return logged.model_id


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
    model_dir: Path,
    registry_cfg: RegistryConfig,
    run_key: str,
    tags: Mapping[str, str],
    input_example: Any,
    adapter_dir: Path | None = None,
) -> RegisteredVersion:
    """Log ``model_dir`` (transformers flavor) into the run and register it, once per run key.

    Args:
        tracking_uri: Tracking/registry store URI (the registry lives in the tracking store).
        run_id: Pipeline run that receives the model (and adapter) artifacts.
        model_dir: Hugging Face model dir: safetensors weights, tokenizer with chat template,
            generation config with eos ids.
        registry_cfg: Registered model name.
        run_key: Identity of this pipeline run; a version already tagged with it is returned.
        tags: Lineage (data_hash, config_hash, base_model, flow_run_id, git_commit, metrics...);
            set, masked, on the model version, the logged model and the run, plus ``run_key``.
        input_example: Prompt string, list of chat messages, or ``{"messages": [...], ...}``.
        adapter_dir: LoRA adapter dir, logged as run artifact ``adapter`` (for serving on a shared
            base); its URI is added to the tags as ``adapter_uri``.

    Returns:
        The version; ``created`` tells whether this call created it.

    Raises:
        FileNotFoundError: ``model_dir`` or ``adapter_dir`` is missing.
        ValueError: the model name or run key contains a quote.
        MlflowException: the store refused an operation.
    """
    name = registry_cfg.model_name
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model (config.json) in {model_dir}")
    existing = find_version_by_run_key(tracking_uri, name, run_key)
    if existing is not None:
        logger.info("run_key %s already registered as %s", run_key, existing.model_uri)
        return existing
    lineage = masked_tags({**tags, RUN_KEY_TAG: run_key})
    if adapter_dir is not None:
        log_artifacts(tracking_uri, run_id, Path(adapter_dir), ADAPTER_ARTIFACT_PATH)
        lineage["adapter_uri"] = f"runs:/{run_id}/{ADAPTER_ARTIFACT_PATH}"
    model_id = _log_transformers_model(tracking_uri, run_id, Path(model_dir), input_example, lineage, name)
    # Logging takes seconds; checking again here shrinks the check-then-create window to the two
    # calls below. Concurrent registrations of one run key can still both create (see report).
    existing = find_version_by_run_key(tracking_uri, name, run_key)
    if existing is not None:
        logger.info("run_key %s was registered meanwhile as %s", run_key, existing.model_uri)
        mlflow_client(tracking_uri).delete_logged_model(model_id)  # our copy is now unused
        return existing
    _ensure_registered_model(tracking_uri, name)
    # Source "models:/<model_id>" links the version to its logged model (the SQL store keeps no
    # model_id column). That store resolves it through the *global* tracking URI (an MLflow TODO;
    # it would read ./mlflow.db of the working directory), hence the fluent context.
    with fluent_tracking_uri(tracking_uri):
        created = mlflow_client(tracking_uri).create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, tags=lineage, model_id=model_id
        )
    set_tags(tracking_uri, run_id, {**lineage, "registered_model_uri": f"models:/{name}/{created.version}"})
    return RegisteredVersion(name=name, version=str(created.version), run_id=run_id,
                             model_uri=f"models:/{name}/{created.version}", created=True)


def load_text_generation(model_uri: str, tracking_uri: str, dst_dir: Path | None = None) -> Pipeline:
    """Load a registered model as a transformers ``text-generation`` pipeline.

    Args:
        model_uri: ``models:/NAME/VERSION`` (or any MLflow model URI).
        tracking_uri: Tracking/registry store URI that resolves ``models:/`` URIs.
        dst_dir: Existing directory to download the artifacts to (a new temp dir when None).

    Returns:
        The pipeline; it accepts a prompt or a list of chat messages (the chat template is
        applied) and stops at the model's eos ids from ``generation_config.json``.
    """
    import mlflow.transformers

    with fluent_tracking_uri(tracking_uri):
        return mlflow.transformers.load_model(model_uri, dst_path=str(dst_dir) if dst_dir else None)
