"""`lora-pipeline serve` under abuse: too-long prompts get a 400 that says so, a full queue a 429, an API key
guards it beyond loopback, and 200 clients at once leave it up.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_pipeline.serving import FixedModel, TextGenerator, build_app
from tests.helpers.scripted_model import ScriptedModel


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _client(model, tokenizer) -> TestClient:
    return TestClient(build_app(FixedModel(TextGenerator(model, tokenizer), {"version": "3"}), "tiny@champion"))


def test_a_prompt_beyond_the_context_window_gets_a_400_that_says_so(tokenizer, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    window = model.config.max_position_embeddings
    client = _client(model, tokenizer)
    reply = client.post("/v1/completions", json={"prompt": "red cat " * window, "max_tokens": 4})
    assert reply.status_code == 400
    assert f"context window is {window} tokens" in reply.json()["detail"]
    huge = client.post("/v1/completions", json={"prompt": "x" * 300_000})  # refused before tokenizing
    assert huge.status_code == 422


def test_an_api_key_is_required_on_v1_but_not_on_health(tokenizer):
    model = ScriptedModel([50, tokenizer.eos_token_id], tokenizer.eos_token_id)
    app = build_app(FixedModel(TextGenerator(model, tokenizer), {"version": "3"}), "tiny@champion", api_key="k3y-123")
    client = TestClient(app)
    body = {"prompt": "red", "max_tokens": 2}
    assert client.post("/v1/completions", json=body).status_code == 401
    assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer k3y-123"}).status_code == 200
    assert client.get("/health").status_code == 200


def test_serving_beyond_loopback_without_an_api_key_is_refused(monkeypatch, capsys):
    from lora_pipeline.cli import main
    from lora_pipeline.serving import API_KEY_ENV

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert main(["serve", "m@champion", "--host", "0.0.0.0"]) == 2
    assert API_KEY_ENV in capsys.readouterr().err


def test_two_hundred_concurrent_requests_end_in_200_400_or_429_and_the_server_stays_up(tokenizer):
    """A real HTTP server with a bounded queue of 8 and a slow model, hit by 200 clients at once."""
    import json
    import threading
    import time
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from tests.helpers.serving import free_port

    class SlowModel(ScriptedModel):
        def generate(self, *args, **kwargs):
            time.sleep(0.02)
            return super().generate(*args, **kwargs)

    model = SlowModel([50, 51, tokenizer.eos_token_id], tokenizer.eos_token_id)
    generator = TextGenerator(model, tokenizer)
    generator.context_window = 64  # so that some requests are too long
    app = build_app(FixedModel(generator, {"version": "3"}), "tiny@champion", max_queue=8)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def call(index: int) -> int:
        prompt = "red cat " * (100 if index % 10 == 0 else 1)  # every tenth prompt is too long
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                         data=json.dumps({"prompt": prompt, "max_tokens": 3}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    try:
        with ThreadPoolExecutor(max_workers=200) as pool:
            statuses = list(pool.map(call, range(200)))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200  # still up
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert set(statuses) <= {200, 400, 429}, sorted(set(statuses))
    assert statuses.count(200) > 0 and statuses.count(429) > 0  # some served, the overflow told to retry
    assert 0 < statuses.count(400) <= 20  # only the too-long prompts (or fewer: some of them got 429 first)
