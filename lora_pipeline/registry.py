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
  (looked up online at logging time), and copy the full base weights for a local directory.

MLflow's adapter form stores no generation config: a plain load gets the *base's* stop ids. So the
logged model's generation config (the full EOS set) is also kept in the MLmodel metadata, restored by
:func:`lora_pipeline.loading.load_text_generation`, and passed as ``model_config`` so MLflow's pyfunc serving stops there too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from mlflow.exceptions import MlflowException
from packaging.version import Version

from lora_pipeline.base_model import resolve_base_dir
from lora_pipeline.logged_models import discard_logged_model, reusable_logged_model
from lora_pipeline.redaction import mask_secrets
from lora_pipeline.tracking import fluent_tracking_uri, log_artifacts, masked_tags, mlflow_client, set_tags

if TYPE_CHECKING:
    from lora_pipeline.config import RegistryConfig

logger = logging.getLogger(__name__)

#: Inference task recorded in the MLmodel: chat-messages signature, HF task "text-generation".
INFERENCE_TASK = "llm/v1/chat"
MODEL_ARTIFACT_NAME = "model"
ADAPTER_ARTIFACT_PATH = "adapter"
RUN_KEY_TAG = "run_key"
#: Version tags: the storage form, the base as given, and the base directory an adapter-form version loads.
STORE_TAG, BASE_MODEL_TAG, BASE_MODEL_PATH_TAG = "store", "base_model", "base_model_path"
#: MLmodel metadata key holding the logged model's generation config (as ``GenerationConfig.to_diff_dict``).
GENERATION_CONFIG_KEY = "generation_config"
Store = Literal["merged", "adapter"]
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


def pip_requirements(packages: Sequence[str] = _REQUIREMENTS) -> list[str]:
    """Exact versions of the installed inference stack (local tags like ``+cpu`` dropped).

    Args:
        packages: Distribution names to pin (default: the stack every stored form needs).

    Returns:
        e.g. ``["torch==2.13.0", "transformers==5.23.0", ...]``; packages not installed are skipped.
    """
    pins = []
    for package in packages:
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


@dataclass(frozen=True)
class _ModelSource:
    """What one registration logs: a merged model dir, or an adapter dir on a local base dir."""

    store: Store
    model_dir: Path | None  # merged form
    adapter_dir: Path | None
    base_dir: Path | None  # adapter form: the resolved local base directory MLflow references
    base_model: str | None  # the base as the caller named it (local path or hub id)

    @property
    def card_dir(self) -> Path:
        return self.model_dir if self.store == "merged" else self.adapter_dir  # type: ignore[return-value]

    def tags(self) -> dict[str, str]:
        tags = {STORE_TAG: self.store}
        if self.base_model is not None:
            tags[BASE_MODEL_TAG] = self.base_model
        if self.base_dir is not None:
            tags[BASE_MODEL_PATH_TAG] = str(self.base_dir)
        return tags


def _model_source(store: str, model_dir: Path | None, adapter_dir: Path | None, base_model: str | None,
                  base_revision: str | None) -> _ModelSource:
    """Check what ``store`` needs before anything is logged; resolve the base of the adapter form."""
    if store not in get_args(Store):
        raise ValueError(f"store must be one of {get_args(Store)}, got {store!r}")
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    if store == "merged":
        if model_dir is None:
            raise ValueError("store='merged' needs model_dir (the merged model)")
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face model (config.json) in {model_dir}")
        return _ModelSource("merged", Path(model_dir), adapter_dir, None, base_model)
    if adapter_dir is None or base_model is None:
        raise ValueError("store='adapter' needs adapter_dir and base_model (local directory or hub id)")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no PEFT adapter (adapter_config.json) in {adapter_dir}")
    return _ModelSource("adapter", None, adapter_dir, resolve_base_dir(base_model, base_revision), base_model)


def _components(source: _ModelSource, eos_token_ids: list[int] | None, trust_remote_code: bool) -> dict[str, Any]:
    """The model (plain, or a ``PeftModel`` on its base) and tokenizer to log, carrying the stop set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.modeling import refuse_unreviewed_remote_code

    # The same rule as training's: a model's own code runs only when the config trusts it.
    refuse_unreviewed_remote_code(source.model_dir or source.base_dir, trust_remote_code)  # type: ignore[arg-type]
    trust = {"trust_remote_code": trust_remote_code}
    if source.store == "merged":
        model = AutoModelForCausalLM.from_pretrained(source.model_dir, dtype="auto", **trust)
        tokenizer_dir = source.model_dir
    else:
        from peft import PeftModel

        # The base in full precision, as MLflow will load it: a registered model must not need
        # bitsandbytes (a QLoRA adapter was trained on the 4-bit base; see merge.py for the parity).
        base = AutoModelForCausalLM.from_pretrained(source.base_dir, dtype="auto", **trust)
        model = PeftModel.from_pretrained(base, str(source.adapter_dir))
        # Training saves the tokenizer (with the chat template it trained on) next to the adapter.
        has_tokenizer = (source.adapter_dir / "tokenizer_config.json").is_file()
        tokenizer_dir = source.adapter_dir if has_tokenizer else source.base_dir
    if eos_token_ids is not None:
        # A PeftModel shares its base's GenerationConfig object, so this sets what MLflow saves and serves.
        model.generation_config.eos_token_id = list(eos_token_ids)
    return {"model": model, "tokenizer": AutoTokenizer.from_pretrained(tokenizer_dir)}


def _eos_list(eos: Any) -> list[int]:
    return [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


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


def _log_transformers_model(tracking_uri: str, run_id: str, source: _ModelSource, input_example: Any,
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
    components = _components(source, eos_token_ids, trust_remote_code)
    # Created here rather than by log_model, which would take the experiment from global state
    # (MLFLOW_EXPERIMENT_ID or the default experiment, whose artifacts go to ./mlruns).
    logged = client.create_logged_model(experiment_id, name=MODEL_ARTIFACT_NAME, source_run_id=run_id,
                                        tags=lineage)
    try:
        _upload(tracking_uri, run_id, logged.model_id, components, source, input_example, name)
    except BaseException:
        # Nothing points at a partial upload (no version yet); its files must not stay behind either.
        discard_logged_model(tracking_uri, logged)
        raise
    return logged.model_id, True


def _upload(tracking_uri: str, run_id: str, model_id: str, components: dict[str, Any], source: _ModelSource,
            input_example: Any, name: str) -> None:
    """``mlflow.transformers.log_model`` into the logged model ``model_id`` (READY when it returns)."""
    import mlflow.transformers

    adapter_form = source.store == "adapter"
    generation_config = components["model"].generation_config
    stop_ids = _eos_list(generation_config.eos_token_id)
    with fluent_tracking_uri(tracking_uri):
        mlflow.transformers.log_model(
            transformers_model=components,
            name=MODEL_ARTIFACT_NAME,
            task=INFERENCE_TASK,  # signature is then fixed by MLflow (chat request/response)
            input_example=_chat_example(input_example),
            pip_requirements=pip_requirements((*_REQUIREMENTS, "peft") if adapter_form else _REQUIREMENTS),
            model_card=_model_card(source.card_dir, name),
            # Adapter form: only the adapter is stored, the base is referenced by its directory
            # (flavor key local_base_model_path; checked against MLflow 3.17).
            base_model_path=str(source.base_dir) if adapter_form else None,
            metadata={GENERATION_CONFIG_KEY: generation_config.to_diff_dict()},
            # Passed to the pipeline on every pyfunc predict: MLflow serving stops at the whole set.
            model_config={"eos_token_id": stop_ids} if stop_ids else None,
            run_id=run_id,
            model_id=model_id,
        )


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
    source = _model_source(store or registry_cfg.store, model_dir, adapter_dir, base_model, base_revision)
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
