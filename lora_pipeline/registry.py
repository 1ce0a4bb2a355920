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
    # Logging takes seconds; checking again here shrinks the check-then-create window.
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
    # Two registrations of one run key can still both get here (the registry has no unique
    # constraint on tags). Both then see both versions; the oldest one wins everywhere, and the
    # process that created a newer one deletes it, so one run key ends with exactly one version.
    winner = find_version_by_run_key(tracking_uri, name, run_key)
    if winner is not None and winner.version != str(created.version):
        logger.warning("run_key %s was registered concurrently as %s: deleting duplicate version %s",
                       run_key, winner.model_uri, created.version)
        mlflow_client(tracking_uri).delete_model_version(name, str(created.version))
        mlflow_client(tracking_uri).delete_logged_model(model_id)
        return winner
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


#: Aliases the pipeline manages. ``candidate``: the newest version that passed the gate;
#: ``champion``: the version to serve; ``previous``: the champion before it (``rollback`` target).
CANDIDATE_ALIAS, CHAMPION_ALIAS, PREVIOUS_ALIAS = "candidate", "champion", "previous"
#: Model-version tag recording which version was champion before this one (the rollback chain).
PREVIOUS_CHAMPION_TAG = "previous_champion"


class PromotionError(RuntimeError):
    """A promotion or rollback cannot be done (unknown version, no previous champion)."""


def version_by_alias(tracking_uri: str, name: str, alias: str) -> str | None:
    """The version number behind ``name@alias``, or None when the alias (or the model) does not exist."""
    try:
        return str(mlflow_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def aliases(tracking_uri: str, name: str) -> dict[str, str]:
    """Every alias of a registered model: ``{alias: version}``."""
    return {alias: str(version) for alias, version in mlflow_client(tracking_uri).get_registered_model(name).aliases.items()}


def set_candidate(tracking_uri: str, name: str, version: str) -> None:
    """Point ``candidate`` at a version that passed the gate."""
    mlflow_client(tracking_uri).set_registered_model_alias(name, CANDIDATE_ALIAS, version)


def promote(tracking_uri: str, name: str, version: str, *, force: bool = False) -> dict[str, str | None]:
    """Move ``champion`` to ``version``; the old champion becomes ``previous`` (one-command rollback).

    Promoting the current champion again changes nothing. A version whose gate failed (tag
    ``gate_passed`` = ``False``) is only promoted with ``force``.

    Returns:
        ``{"champion": version, "previous": old champion or None}``.

    Raises:
        PromotionError: the version does not exist, or failed the gate and ``force`` is not set.
    """
    client = mlflow_client(tracking_uri)
    try:
        model_version = client.get_model_version(name, version)
    except MlflowException as exc:
        raise PromotionError(f"{name} has no version {version}") from exc
    if model_version.tags.get("gate_passed") == "False" and not force:
        raise PromotionError(f"{name} version {version} failed the gate ({model_version.tags.get('gate_reasons', '')}); "
                             "promote it anyway with force (CLI: --force)")
    current = version_by_alias(tracking_uri, name, CHAMPION_ALIAS)
    if current == str(version):
        return {"champion": str(version), "previous": version_by_alias(tracking_uri, name, PREVIOUS_ALIAS)}
    if current is not None:
        client.set_model_version_tag(name, version, PREVIOUS_CHAMPION_TAG, current)
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, current)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    logger.info("promoted %s version %s to champion (previous: %s)", name, version, current)
    return {"champion": str(version), "previous": current}


def rollback(tracking_uri: str, name: str) -> dict[str, str | None]:
    """Make ``previous`` the champion again; ``previous`` then moves one step further back.

    The rolled-back version keeps its number and artefacts (nothing is deleted); it is tagged
    ``rolled_back`` so the registry shows why it stopped serving.

    Returns:
        ``{"champion": restored version, "previous": the one before it or None, "rolled_back": version}``.

    Raises:
        PromotionError: there is no champion or no previous champion.
    """
    client = mlflow_client(tracking_uri)
    current = version_by_alias(tracking_uri, name, CHAMPION_ALIAS)
    restored = version_by_alias(tracking_uri, name, PREVIOUS_ALIAS)
    if current is None or restored is None:
        raise PromotionError(f"{name}: nothing to roll back to (champion={current}, previous={restored})")
    client.set_registered_model_alias(name, CHAMPION_ALIAS, restored)
    client.set_model_version_tag(name, current, "rolled_back", "true")
    before = client.get_model_version(name, restored).tags.get(PREVIOUS_CHAMPION_TAG)
    if before == current:  # it replaced the version being rolled back: the chain ends here
        before = None
    if before:
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, before)
    else:
        client.delete_registered_model_alias(name, PREVIOUS_ALIAS)
    logger.info("rolled %s back from version %s to %s", name, current, restored)
    return {"champion": restored, "previous": before or None, "rolled_back": current}
