"""Serving throughput, side by side (issue 12 item 10): ``serve``'s app (``lora_pipeline.serving.build_app``, batching
greedy requests) on a real HTTP server (uvicorn on loopback, in a child process as ``lora-pipeline serve`` runs) in
front of the real-model fixture (SmolLM2-135M-Instruct, de-quantised to float32, its whole stop set as a
registered model carries it). The same chat prompts (the package's general prompts, greedy, ``max_tokens`` 32)
are sent by one client, one after another, then by 8 concurrent clients. Completion tokens/s of each side, their
ratio (target: >= 3x), the batch sizes the model saw, how many prompt tokens each generate() call took from
``serve``'s prefix cache (``--no-reuse-prefix``: the server prefills every prompt whole), and whether every answer
(text, finish reason, usage) is identical on both sides.

Usage: ``.venv/bin/python -m benchmarks.serving [--prompts 16] [--clients 8] [--repeats 3] [--threads N]
[--no-reuse-prefix] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.evaluation import CACHE, RESOURCES, real_model_dir

REPO = Path(__file__).resolve().parents[1]


def serve(port: int, batch_log: Path, threads: int | None, reuse_prefix: bool) -> None:
    """The child: SmolLM2 behind ``build_app`` on 127.0.0.1:``port``; each generate() call's batch size and the
    prefix tokens it took from the prefix cache go to ``batch_log``, one line per call."""
    import torch
    import uvicorn
    from transformers import AutoModelForCausalLM

    from lora_pipeline.config import ModelConfig
    from lora_pipeline.formatting import stop_token_ids
    from lora_pipeline.modeling import load_tokenizer
    from lora_pipeline.serving import FixedModel, TextGenerator, build_app

    if threads:
        torch.set_num_threads(threads)
    model_dir = real_model_dir(CACHE)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    # The whole stop set, as a registered (merged) model carries it (lora_pipeline.merge).
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    generator = TextGenerator(model, tokenizer, reuse_prefix=reuse_prefix)
    cache_argument = generator.prefix_cache.argument if generator.prefix_cache is not None else None
    generate = model.generate

    def logged_generate(**kwargs):
        prefix = kwargs.get(cache_argument) if cache_argument else None
        with batch_log.open("a") as log:
            log.write(f"{len(kwargs['input_ids'])} {prefix.get_seq_length() if prefix is not None else 0}\n")
        return generate(**kwargs)

    model.generate = logged_generate
    info = {"weights": model_dir.name, "torch_threads": str(torch.get_num_threads()),  # reported by /health
            "reuse_prefix": str(reuse_prefix)}
    app = build_app(FixedModel(generator, info), "smollm2@bench")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def http(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One greedy chat completion: the parts of the reply that must not depend on batching."""
    reply = http(f"{url}/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    choice = reply["choices"][0]
    return {"content": choice["message"]["content"], "finish_reason": choice["finish_reason"], "usage": reply["usage"]}


def run_side(url: str, prompts: list[list[dict]], max_tokens: int, clients: int) -> tuple[float, list[dict]]:
    """Wall time and replies of ``prompts`` sent by ``clients`` clients (each sends its next when answered)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        replies = list(pool.map(lambda messages: chat(url, messages, max_tokens), prompts))
    return time.perf_counter() - started, replies


def start_server(out: Path, threads: int | None, reuse_prefix: bool) -> tuple[subprocess.Popen, str, Path]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    batch_log = out / "serving-batches.log"
    batch_log.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.serving", "--_serve", str(port), str(batch_log)]
    if threads:
        command += ["--threads", str(threads)]
    if not reuse_prefix:
        command.append("--no-reuse-prefix")
    server = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            http(f"{url}/health")
            return server, url, batch_log
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the server did not start: {server.stderr.read()[-3000:]}") from None
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="how many of the package's 40 general prompts")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the batched side")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="the server's torch threads (default: torch's own)")
    parser.add_argument("--reuse-prefix", action=argparse.BooleanOptionalAction, default=True,
                        help="the server keeps the shared prompt prefix's KV cache (serve's default)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    parser.add_argument("--_serve", nargs=2, metavar=("PORT", "BATCH_LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._serve:
        serve(int(args._serve[0]), Path(args._serve[1]), args.threads, args.reuse_prefix)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (RESOURCES / "general_prompts.jsonl").read_text().splitlines()]
    prompts = [row["messages"] for row in rows[: args.prompts]]
    timings: dict[str, list[float]] = {"one_client": [], "concurrent": []}
    replies: dict[str, list[dict]] = {}
    load_before = os.getloadavg()[0]  # other work on the machine skews both sides: recorded with the result
    server, url, batch_log = start_server(args.out, args.threads, args.reuse_prefix)
    try:
        health = http(f"{url}/health")
        chat(url, prompts[0], 4)  # warm-up: first-call allocations, the server's first connection
        batch_log.unlink(missing_ok=True)
        for _ in range(args.repeats):
            for side, clients in (("one_client", 1), ("concurrent", args.clients)):
                seconds, replies[side] = run_side(url, prompts, args.max_tokens, clients)
                timings[side].append(seconds)
    finally:
        server.terminate()
        server.wait(timeout=60)
    calls = [line.split() for line in batch_log.read_text().splitlines()]
    batch_sizes = Counter(int(size) for size, _ in calls)
    prefix_tokens = Counter(int(prefix) for _, prefix in calls)
    batch_log.unlink()
    tokens = {side: sum(reply["usage"]["completion_tokens"] for reply in side_replies)
              for side, side_replies in replies.items()}
    medians = {side: statistics.median(values) for side, values in timings.items()}
    per_second = {side: tokens[side] / medians[side] for side in timings}
    differing = [i for i, (a, b) in enumerate(zip(replies["one_client"], replies["concurrent"])) if a != b]
    result = {"model": health["weights"], "prompts": len(prompts), "clients": args.clients,
              "max_tokens": args.max_tokens, "torch_threads": int(health["torch_threads"]), "repeats": args.repeats,
              "cpus": os.cpu_count(), "load_average": {"before": load_before, "after": os.getloadavg()[0]},
              "seconds": {side: [round(value, 2) for value in values] for side, values in timings.items()},
              "median_seconds": {side: round(value, 2) for side, value in medians.items()},
              "completion_tokens": tokens,
              "completion_tokens_per_second": {side: round(value, 1) for side, value in per_second.items()},
              "speedup": round(per_second["concurrent"] / per_second["one_client"], 2), "target": ">= 3.0",
              # every generate() call of all repeats, both sides (the one-client side's are all batches of 1)
              "batch_sizes": dict(sorted(batch_sizes.items())),
              # prompt tokens each generate() call took from the prefix cache (0: prefilled whole)
              "reuse_prefix": health["reuse_prefix"] == "True",
              "prefix_tokens_reused": dict(sorted(prefix_tokens.items())),
              "answers_differing": differing,
              "examples": [{"one_client": replies["one_client"][i], "concurrent": replies["concurrent"][i]}
                           for i in differing[:3]]}
    (args.out / "serving.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
