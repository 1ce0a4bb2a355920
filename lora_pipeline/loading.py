"""Load a registered version, merged or adapter form, ready to generate (evaluation and serving).

The adapter form is MLflow's own PEFT form: ``mlflow.transformers.load_model`` loads the base from the
directory recorded at registration and applies the adapter. MLflow does not store a generation config
for it, so the stop set logged in the MLmodel metadata is restored here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_pipeline.model_flavor import GENERATION_CONFIG_KEY, Store
from lora_pipeline.tracking import fluent_tracking_uri

if TYPE_CHECKING:
    from transformers import Pipeline


def load_text_generation(model_uri: str, tracking_uri: str, dst_dir: Path | None = None, *,
                         base_model_path: Path | None = None, trust_remote_code: bool = False) -> Pipeline:
    """Load a registered model, either form, as a transformers ``text-generation`` pipeline.

    Args:
        model_uri: ``models:/NAME/VERSION`` (or any MLflow model URI).
        tracking_uri: Tracking/registry store URI that resolves ``models:/`` URIs.
        dst_dir: Existing directory to download the artifacts to (a new temp dir when None).
        base_model_path: Adapter form only: load the base from here instead of the directory
            recorded at registration (e.g. another machine's mount of the same base).
        trust_remote_code: Allow a model (or adapter base) whose config names its own code; without it
            such a version is refused before anything is loaded, as in training.

    Returns:
        The pipeline; its model is a ``PeftModel`` (base + adapter) for the adapter form. It accepts
        a prompt or a list of chat messages (the chat template is applied) and stops at every id of
        the generation config logged with the model.

    Raises:
        FileNotFoundError: an adapter-form version whose base directory is not there.
        RemoteCodeRefused: the model or its base ships its own code and ``trust_remote_code`` is False.
    """
    import tempfile

    import mlflow.artifacts
    import mlflow.transformers
    from mlflow.models import get_model_info

    from lora_pipeline.modeling import refuse_unreviewed_remote_code

    with fluent_tracking_uri(tracking_uri):
        info = get_model_info(model_uri)
        base_dir = base_model_path or info.flavors["transformers"].get("local_base_model_path")
        if base_dir is not None and not (Path(base_dir) / "config.json").is_file():
            raise FileNotFoundError(f"{model_uri} stores an adapter on the base model at {base_dir}, which is not "
                                    "there: restore it, or pass base_model_path")
        # Downloaded first, so the stored config is checked before MLflow loads (and so runs) anything.
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst_dir or tempfile.mkdtemp())))
        for model_dir in (local / "model", Path(base_dir) if base_dir else None):
            if model_dir is not None and (model_dir / "config.json").is_file():
                refuse_unreviewed_remote_code(model_dir, trust_remote_code)
        pipe = mlflow.transformers.load_model(str(local),
                                              base_model_path=str(base_model_path) if base_model_path else None)
    if stored := (info.metadata or {}).get(GENERATION_CONFIG_KEY):
        _set_generation_config(pipe.model, stored)
    return pipe


def _set_generation_config(model: Any, stored: dict[str, Any]) -> None:
    """Restore the logged generation config (versions logged before it was stored keep their own)."""
    from peft import PeftModel
    from transformers import GenerationConfig

    # On the transformers model itself: PeftModel.generate runs the base model's generate().
    target = model.get_base_model() if isinstance(model, PeftModel) else model
    target.generation_config = GenerationConfig.from_dict(stored)


@dataclass(frozen=True)
class LoadedModel:
    """A registered version ready to generate.

    Attributes:
        model: The causal LM: a ``PeftModel`` (base + adapter) for an adapter-form version unless
            loaded with ``merge_adapter``; ``generation_config.eos_token_id`` is the registered stop set.
        tokenizer: Its tokenizer, with the chat template it was trained with.
        store: ``"merged"`` or ``"adapter"``: how the version is stored.
    """

    model: Any
    tokenizer: Any
    store: Store


def load_registered_model(model_uri: str, tracking_uri: str, dst_dir: Path | None = None, *,
                          merge_adapter: bool = False, base_model_path: Path | None = None,
                          trust_remote_code: bool = False) -> LoadedModel:
    """Load a registered version, either form, as model + tokenizer (see :func:`load_text_generation`).

    Args:
        model_uri: ``models:/NAME/VERSION`` (or any MLflow model URI).
        tracking_uri: Tracking/registry store URI that resolves ``models:/`` URIs.
        dst_dir: Existing directory to download the artifacts to (a new temp dir when None).
        merge_adapter: Merge an adapter-form version's adapter into its base in memory
            (``merge_and_unload(safe_merge=True)``): as fast as a merged model, for serving. Off, the
            ``PeftModel`` computes exactly what was registered (evaluation).
        base_model_path: Adapter form only: where the base is, if not where it was at registration.
        trust_remote_code: See :func:`load_text_generation`.

    Raises:
        FileNotFoundError: an adapter-form version whose base directory is not there.
        MergeError: the in-memory merge left LoRA layers behind.
    """
    from peft import PeftModel

    pipe = load_text_generation(model_uri, tracking_uri, dst_dir, base_model_path=base_model_path,
                                trust_remote_code=trust_remote_code)
    model = pipe.model
    store: Store = "adapter" if isinstance(model, PeftModel) else "merged"
    if merge_adapter and store == "adapter":
        from lora_pipeline.merge import merge_lora

        model = merge_lora(model)  # the base's generation config (the stop set) stays on it
    return LoadedModel(model=model.eval(), tokenizer=pipe.tokenizer, store=store)
