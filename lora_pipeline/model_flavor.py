"""A registered model as MLflow's transformers flavor logs it: what is stored, with which requirements, example,
card and generation config, and the upload itself (:mod:`lora_pipeline.registry` decides when and where)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, get_args

from packaging.version import Version

from lora_pipeline.base_model import resolve_base_dir
from lora_pipeline.tracking import fluent_tracking_uri

#: Inference task recorded in the MLmodel: chat-messages signature, HF task "text-generation".
INFERENCE_TASK = "llm/v1/chat"
MODEL_ARTIFACT_NAME = "model"
#: Version tags: the storage form, the base as given, and the base directory an adapter-form version loads.
STORE_TAG, BASE_MODEL_TAG, BASE_MODEL_PATH_TAG = "store", "base_model", "base_model_path"
#: MLmodel metadata key holding the logged model's generation config (as ``GenerationConfig.to_diff_dict``).
GENERATION_CONFIG_KEY = "generation_config"
Store = Literal["merged", "adapter"]
#: Pinned into the model's requirements.txt (MLflow adds itself). Explicit because MLflow's
#: inference imports every installed integration and fails without torchvision.
_REQUIREMENTS = ("torch", "transformers", "accelerate", "safetensors", "tokenizers")
_EXAMPLE_MAX_TOKENS = 8


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


def chat_example(input_example: Any) -> dict[str, Any]:
    """Normalise a prompt, a message list or a chat request to an ``llm/v1/chat`` request."""
    if isinstance(input_example, str):
        return {"messages": [{"role": "user", "content": input_example}], "max_tokens": _EXAMPLE_MAX_TOKENS}
    if isinstance(input_example, list):
        return {"messages": input_example, "max_tokens": _EXAMPLE_MAX_TOKENS}
    if isinstance(input_example, Mapping) and "messages" in input_example:
        return {"max_tokens": _EXAMPLE_MAX_TOKENS, **input_example}
    raise TypeError("input_example must be a prompt string, a list of chat messages or a dict with 'messages'")


@dataclass(frozen=True)
class ModelSource:
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


def model_source(store: str, model_dir: Path | None, adapter_dir: Path | None, base_model: str | None,
                  base_revision: str | None, base_dir: Path | None = None) -> ModelSource:
    """Check what ``store`` needs before anything is logged; resolve the base of the adapter form (``base_dir``
    when given: the directory it loads, e.g. the de-quantised weights a QLoRA adapter was trained on)."""
    if store not in get_args(Store):
        raise ValueError(f"store must be one of {get_args(Store)}, got {store!r}")
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    if store == "merged":
        if model_dir is None:
            raise ValueError("store='merged' needs model_dir (the merged model)")
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face model (config.json) in {model_dir}")
        return ModelSource("merged", Path(model_dir), adapter_dir, None, base_model)
    if adapter_dir is None or base_model is None:
        raise ValueError("store='adapter' needs adapter_dir and base_model (local directory or hub id)")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no PEFT adapter (adapter_config.json) in {adapter_dir}")
    if base_dir is None:
        base_dir = resolve_base_dir(base_model, base_revision)
    elif not (Path(base_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model (config.json) in base directory {base_dir}")
    return ModelSource("adapter", None, adapter_dir, Path(base_dir).resolve(), base_model)


def load_components(source: ModelSource, eos_token_ids: list[int] | None, trust_remote_code: bool) -> dict[str, Any]:
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

        # The base as MLflow will load it, never quantised: a registered model must not need bitsandbytes
        # (a QLoRA adapter's base directory holds the 4-bit weights it was trained on, de-quantised).
        base = AutoModelForCausalLM.from_pretrained(source.base_dir, dtype="auto", **trust)
        model = PeftModel.from_pretrained(base, str(source.adapter_dir))
        # Training saves the tokenizer (with the chat template it trained on) next to the adapter.
        has_tokenizer = (source.adapter_dir / "tokenizer_config.json").is_file()
        tokenizer_dir = source.adapter_dir if has_tokenizer else source.base_dir
    if eos_token_ids is not None:
        # A PeftModel shares its base's GenerationConfig object, so this sets what MLflow saves and serves.
        model.generation_config.eos_token_id = list(eos_token_ids)
    return {"model": model, "tokenizer": AutoTokenizer.from_pretrained(tokenizer_dir)}


def eos_list(eos: Any) -> list[int]:
    return [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


def model_card(model_dir: Path, name: str) -> Any:
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


def upload_model(tracking_uri: str, run_id: str, model_id: str, components: dict[str, Any], source: ModelSource,
            input_example: Any, name: str) -> None:
    """``mlflow.transformers.log_model`` into the logged model ``model_id`` (READY when it returns)."""
    import mlflow.transformers

    adapter_form = source.store == "adapter"
    generation_config = components["model"].generation_config
    stop_ids = eos_list(generation_config.eos_token_id)
    with fluent_tracking_uri(tracking_uri):
        mlflow.transformers.log_model(
            transformers_model=components,
            name=MODEL_ARTIFACT_NAME,
            task=INFERENCE_TASK,  # signature is then fixed by MLflow (chat request/response)
            input_example=chat_example(input_example),
            pip_requirements=pip_requirements((*_REQUIREMENTS, "peft") if adapter_form else _REQUIREMENTS),
            model_card=model_card(source.card_dir, name),
            # Adapter form: only the adapter is stored, the base is referenced by its directory
            # (flavor key local_base_model_path; checked against MLflow 3.17).
            base_model_path=str(source.base_dir) if adapter_form else None,
            metadata={GENERATION_CONFIG_KEY: generation_config.to_diff_dict()},
            # Passed to the pipeline on every pyfunc predict: MLflow serving stops at the whole set.
            model_config={"eos_token_id": stop_ids} if stop_ids else None,
            run_id=run_id,
            model_id=model_id,
        )
