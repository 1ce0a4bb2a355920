"""`lora-pipeline serve`: OpenAI-compatible completions and chat completions over one model.

Under abuse (too-long prompts, a full queue, an API key beyond loopback, 200 clients at once):
tests/reliability/test_serving_abuse.py.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_pipeline.serving import FixedModel, TextGenerator, build_app, parse_model_reference
from tests.helpers.scripted_model import ScriptedModel


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
