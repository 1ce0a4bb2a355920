"""The offline demo world: synthetic task and regression data, a BPE tokenizer and a tiny pre-trained Llama.

Deterministic from its spec and cached on disk under the spec's hash, it lets the pipeline run end to
end with the same ``from_pretrained`` calls that load a hub model elsewhere. Never imports Prefect.
"""

from lora_pipeline.demo_world.spec import FORMAT_VERSION, DemoWorldSpec
from lora_pipeline.demo_world.world import DemoWorld, ensure_demo_world

__all__ = ["FORMAT_VERSION", "DemoWorld", "DemoWorldSpec", "ensure_demo_world"]
