"""`lora-pipeline serve`: OpenAI-compatible completions and chat completions over one model."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lora_pipeline.serving import FixedModel, TextGenerator, build_app, parse_model_reference


class ScriptedModel(torch.nn.Module):
    """Answers with a fixed token sequence and records the prompts it was given."""

    def __init__(self, answer: list[int], eos_token_id: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.answer = answer
        self.generation_config = GenerationConfig(eos_token_id=eos_token_id)
        self.prompts: list[list[int]] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.prompts.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.tensor([self.answer[:max_new_tokens]])], dim=1)


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _client(model, tokenizer) -> TestClient:
    return TestClient(build_app(FixedModel(TextGenerator(model, tokenizer), {"version": "3"}), "tiny@champion"))


def test_chat_completion_applies_the_chat_template_and_stops_at_eos(tokenizer):
    answer = tokenizer("red cat", add_special_tokens=False)["input_ids"]
    model = ScriptedModel(answer + [tokenizer.eos_token_id, 99, 98], tokenizer.eos_token_id)
    messages = [{"role": "user", "content": "repeat red cat"}]
    reply = _client(model, tokenizer).post("/v1/chat/completions", json={"messages": messages, "max_tokens": 20})
    assert reply.status_code == 200
    body = reply.json()
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert model.prompts == [list(expected_prompt)]
    assert body["object"] == "chat.completion" and body["model"] == "tiny@champion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "red cat"}  # cut at EOS
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": len(expected_prompt), "completion_tokens": len(answer) + 1,
                             "total_tokens": len(expected_prompt) + len(answer) + 1}


def test_completion_that_hits_the_budget_says_length(tokenizer):
    model = ScriptedModel([50, 51, 52, 53, 54], tokenizer.eos_token_id)
    body = _client(model, tokenizer).post("/v1/completions", json={"prompt": "red", "max_tokens": 3}).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
    assert model.prompts == [tokenizer("red")["input_ids"]]


def test_real_model_generates_within_budget_greedy_and_sampled(tokenizer, tiny_model_dir):
    client = _client(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    request = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    greedy = [client.post("/v1/chat/completions", json=request).json() for _ in range(2)]
    assert greedy[0]["choices"] == greedy[1]["choices"]  # temperature 0 is deterministic
    for body in greedy:
        usage, reason = body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]
        assert usage <= 4 and (reason == "stop" or usage == 4)
    sampled = client.post("/v1/chat/completions", json={**request, "temperature": 0.8, "seed": 1})
    assert sampled.status_code == 200


def test_health_models_and_bad_requests(tokenizer):
    client = _client(ScriptedModel([1], tokenizer.eos_token_id), tokenizer)
    assert client.get("/health").json() == {"status": "ok", "model": "tiny@champion", "version": "3"}
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny@champion"
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 422
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 422
    streamed = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                          "stream": True})
    assert streamed.status_code == 400 and "stream=true is not supported" in streamed.json()["detail"]


def test_model_reference_must_name_an_alias():
    assert parse_model_reference("my-model@champion") == ("my-model", "champion")
    for bad in ("my-model", "@champion", "my-model@"):
        with pytest.raises(ValueError, match="NAME@ALIAS"):
            parse_model_reference(bad)


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
