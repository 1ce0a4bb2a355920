"""The offline demo world: synthetic task and regression data, a BPE tokenizer and a tiny pre-trained Llama.

Deterministic from its spec and cached on disk under the spec's hash, it lets the pipeline run end to
end with the same ``from_pretrained`` calls that load a hub model elsewhere. Never imports Prefect.

The spec is imported eagerly (the config schema holds one); building the world needs torch and
transformers, so :class:`DemoWorld` and :func:`ensure_demo_world` are imported on first use: reading a
config, or ``lora-pipeline --help``, does not pay seconds of imports for them.
"""

from typing import Any

from lora_pipeline.demo_world.spec import FORMAT_VERSION, DemoWorldSpec

__all__ = ["FORMAT_VERSION", "DemoWorld", "DemoWorldSpec", "ensure_demo_world"]


def __getattr__(name: str) -> Any:
    if name in ("DemoWorld", "ensure_demo_world"):
        from lora_pipeline.demo_world import world

        return getattr(world, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
