"""`serve` batches greedy requests that wait for the model: one left-padded generate() for them, each answer
exactly what it gets alone (text, finish_reason, usage). Sampled and seeded requests run alone; an error of a
batch reaches every request in it; each model batches only its own requests; shutdown does not wait on it.

Throughput (8 clients vs 1 on SmolLM2): benchmarks/serving.py.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_pipeline.serving import CompletionRequest, FixedModel, Served, TextGenerator, build_app
from lora_pipeline.serving_batch import Batcher, RowBudgets
from tests.conftest import ANIMALS, COLOURS
from tests.helpers.scripted_model import ScriptedModel

FIRST = {"prompt": "red", "max_tokens": 2}  # holds the model while the requests under test queue behind it


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


class Gate:
    """Wraps ``model.generate``: records each call's batch size and budget; the first call waits for ``open()``."""

    def __init__(self, model) -> None:
        self.entered, self._open = threading.Event(), threading.Event()
        self.batch_sizes: list[int] = []
        self.budgets: list[int] = []
        inner = model.generate

        def generate(*args, **kwargs):
            self.batch_sizes.append(len(kwargs["input_ids"]))
            self.budgets.append(kwargs["max_new_tokens"])
            self.entered.set()
            assert self._open.wait(30), "the test never opened the gate"
            return inner(*args, **kwargs)

        model.generate = generate

    def open(self) -> None:
        self._open.set()


def _queue_behind_first(client, generator: TextGenerator, gate: Gate, bodies: list[dict],
                        path: str = "/v1/completions") -> list:
    """Send FIRST, then ``bodies`` concurrently while FIRST holds the model; open once all are queued."""
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        first = pool.submit(client.post, path, json=FIRST if path == "/v1/completions" else _chat(FIRST))
        assert gate.entered.wait(30)
        replies = []
        for body in bodies:  # one at a time, so that they queue in this order
            replies.append(pool.submit(client.post, path, json=body))
            _wait_for(lambda: generator.batcher.waiting == len(replies))
        gate.open()
        assert first.result().status_code == 200
        return [reply.result() for reply in replies]


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _chat(body: dict) -> dict:
    return {"messages": [{"role": "user", "content": body["prompt"]}],
            **{key: value for key, value in body.items() if key != "prompt"}}


def _answer(reply) -> tuple:
    """What must not depend on batching (ids and timestamps do)."""
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return body["choices"], body["usage"]


def _prompt(start: int, words: int) -> str:
    vocabulary = COLOURS + ANIMALS
    return " ".join(vocabulary[(start + i) % len(vocabulary)] for i in range(words))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_concurrent_greedy_requests_share_one_generate_and_answer_as_alone(tokenizer, tiny_model_dir, path):
    """The real (tiny, random) model: prompts of different lengths (the batch is left-padded), different budgets."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = TextGenerator(model, tokenizer)
    client = TestClient(build_app(FixedModel(generator), "tiny@champion"))
    bodies = [{"prompt": _prompt(i, words), "max_tokens": budget}
              for i, (words, budget) in enumerate([(1, 12), (9, 3), (3, 12), (17, 7), (6, 1), (2, 12)])]
    if path == "/v1/chat/completions":
        bodies = [_chat(body) for body in bodies]
    alone = [_answer(client.post(path, json=body)) for body in bodies]
    gate = Gate(model)
    batched = _queue_behind_first(client, generator, gate, bodies, path)
    assert gate.batch_sizes == [1, 6]  # FIRST, then the six together
    assert [_answer(reply) for reply in batched] == alone  # byte-identical text, finish_reason, usage


def test_left_padding_without_its_attention_mask_would_change_the_answers(tokenizer, tiny_model_dir, monkeypatch):
    """The test above has teeth: padding attended to (no mask) changes greedy answers of the tiny model."""
    from lora_pipeline import serving_batch

    generator = TextGenerator(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    request = CompletionRequest(prompt="x", max_tokens=12)
    jobs = [(generator.text_prompt_ids(_prompt(i, words)), request) for i, words in enumerate([1, 9, 3, 17])]
    masked = generator._generate_batch(jobs)
    assert masked == [generator._generate_batch([job])[0] for job in jobs]
    padded = serving_batch.left_pad
    monkeypatch.setattr(serving_batch, "left_pad", lambda prompts, pad, device=None: (
        padded(prompts, pad, device)[0], torch.ones_like(padded(prompts, pad, device)[1])))
    assert generator._generate_batch(jobs) != masked


def test_mixed_budgets_are_generated_to_the_largest_and_cut_at_each_own(tokenizer):
    eos = tokenizer.eos_token_id
    model = ScriptedModel([50, 51, eos, 99, 98], eos)
    generator = TextGenerator(model, tokenizer)
    client = TestClient(build_app(FixedModel(generator), "tiny@champion"))
    bodies = [{"prompt": "red cat " * words, "max_tokens": budget}
              for words, budget in [(1, 1), (3, 2), (2, 3), (5, 5)]]
    alone = [_answer(client.post("/v1/completions", json=body)) for body in bodies]
    gate = Gate(model)
    batched = [_answer(reply) for reply in _queue_behind_first(client, generator, gate, bodies)]
    assert gate.batch_sizes == [1, 4] and gate.budgets == [2, 5]
    assert batched == alone
    # Rows are done at their own budget (generate() stops once every row is done, by budget or stop id).
    stop_rows = RowBudgets(prompt_width=4, budgets=[1, 2, 3, 5])
    assert stop_rows(torch.zeros((4, 6), dtype=torch.long), None).tolist() == [True, True, False, False]
    assert [(choices[0]["finish_reason"], usage["completion_tokens"]) for choices, usage in batched] == [
        ("length", 1), ("length", 2), ("stop", 3), ("stop", 3)]


def test_sampled_and_seeded_requests_run_alone_and_stay_reproducible(tokenizer, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = TextGenerator(model, tokenizer)
    client = TestClient(build_app(FixedModel(generator), "tiny@champion"))
    greedy = [{"prompt": _prompt(i, 3 + i), "max_tokens": 8} for i in range(2)]
    sampled = {"prompt": "red cat", "max_tokens": 8, "temperature": 0.9, "seed": 7}
    seeded_greedy = {"prompt": "blue owl", "max_tokens": 8, "seed": 3}
    bodies = [greedy[0], sampled, greedy[1], seeded_greedy]
    alone = [_answer(client.post("/v1/completions", json=body)) for body in bodies]
    gate = Gate(model)
    batched = _queue_behind_first(client, generator, gate, bodies)
    # FIRST; the two greedy ones (the sampled one waits, as the oldest, for the next batch); then each alone.
    assert gate.batch_sizes == [1, 2, 1, 1]
    assert [_answer(reply) for reply in batched] == alone  # the same seed samples the same answer


def test_requests_that_would_overflow_the_context_window_together_do_not_share_a_batch(tokenizer):
    model = ScriptedModel([50, 51, 52, 53], tokenizer.eos_token_id)
    generator = TextGenerator(model, tokenizer)
    generator.context_window = 64
    client = TestClient(build_app(FixedModel(generator), "tiny@champion"))
    long_prompt = {"prompt": "red cat " * 15, "max_tokens": 2}  # 45 tokens + 2: fits alone
    long_budget = {"prompt": "red", "max_tokens": 30}  # fits alone; with the long prompt, 45 + 30 would not
    short = {"prompt": "blue", "max_tokens": 3}
    gate = Gate(model)
    replies = _queue_behind_first(client, generator, gate, [long_prompt, long_budget, short])
    assert [reply.status_code for reply in replies] == [200, 200, 200]
    assert gate.batch_sizes == [1, 2, 1]  # the long prompt with the short request; the long budget alone


def test_an_error_in_a_batch_reaches_every_request_of_it_and_none_hangs(tokenizer):
    class FailsOnBatches(ScriptedModel):
        def generate(self, input_ids, *args, **kwargs):
            if len(input_ids) > 1:
                raise RuntimeError("out of memory (simulated)")
            return super().generate(input_ids, *args, **kwargs)

    model = FailsOnBatches([50, tokenizer.eos_token_id], tokenizer.eos_token_id)
    generator = TextGenerator(model, tokenizer)
    gate = Gate(model)
    prompt = generator.text_prompt_ids("red")
    outcomes: list[object] = []

    def call() -> None:
        try:
            outcomes.append(generator.generate(prompt, CompletionRequest(prompt="red", max_tokens=2)))
        except RuntimeError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(5)]
    threads[0].start()
    assert gate.entered.wait(30)
    for thread in threads[1:]:
        thread.start()
    _wait_for(lambda: generator.batcher.waiting == 4)
    gate.open()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a request of the failed batch hangs"
    errors = [outcome for outcome in outcomes if isinstance(outcome, RuntimeError)]
    assert len(errors) == 4 and all("out of memory" in str(error) for error in errors)
    assert gate.batch_sizes == [1, 4]
    # The model is free again: the next request is answered.
    assert generator.generate(prompt, CompletionRequest(prompt="red", max_tokens=2)).finish_reason == "stop"


def test_each_model_batches_its_own_requests_across_a_swap(tokenizer):
    """Requests queued on the old model finish on it, in their own batch; the new model answers meanwhile."""
    eos = tokenizer.eos_token_id
    old_model, new_model = ScriptedModel([50, eos], eos), ScriptedModel([60, eos], eos)

    class Swappable:
        def __init__(self) -> None:
            self.served = Served(TextGenerator(old_model, tokenizer), {"version": "1"})

        def current(self) -> Served:
            return self.served

    source = Swappable()
    old = source.served.generator
    client = TestClient(build_app(source, "tiny@champion"))
    gate = Gate(old_model)
    old_text = tokenizer.decode([50])
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.post, "/v1/completions", json=FIRST)
        assert gate.entered.wait(30)
        queued = [pool.submit(client.post, "/v1/completions", json={"prompt": "cat", "max_tokens": 2})
                  for _ in range(2)]
        _wait_for(lambda: old.batcher.waiting == 2)
        source.served = Served(TextGenerator(new_model, tokenizer), {"version": "2"})
        # The old model is still held: the new one answers without waiting for it.
        new_reply = client.post("/v1/completions", json={"prompt": "cat", "max_tokens": 2})
        assert new_reply.json()["choices"][0]["text"] == tokenizer.decode([60])
        assert not first.done()
        gate.open()
        old_replies = [first.result(), *(reply.result() for reply in queued)]
    assert [reply.json()["choices"][0]["text"] for reply in old_replies] == [old_text] * 3
    assert gate.batch_sizes == [1, 2] and new_model.batch_sizes == [1]


def test_the_batcher_delivers_results_in_order_and_refuses_a_bad_size():
    batches: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        batches.append(items)
        return [item * item for item in items]

    batcher: Batcher[int, int] = Batcher(square, max_batch=3)
    assert batcher.submit(4, batchable=True) == 16 and batches == [[4]]
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        Batcher(square, max_batch=0)
    wrong = Batcher(lambda items: [], max_batch=2)
    with pytest.raises(RuntimeError, match="a batch of 1 requests got 0 results"):
        wrong.submit(1, batchable=True)


@pytest.mark.parametrize("submits", [True, False])
def test_a_batch_waits_for_an_announced_request_and_no_longer_once_it_is_withdrawn(submits):
    """The first request of a burst waits for those already in the server (being tokenized), not for gather_seconds."""
    batches: list[list[str]] = []
    batcher: Batcher[str, str] = Batcher(lambda items: batches.append(list(items)) or list(items), max_batch=4,
                                         gather_seconds=20)
    announced, tokenized = threading.Event(), threading.Event()

    def arriving_request() -> None:
        with batcher.arriving():
            announced.set()
            assert tokenized.wait(30)
            if submits:  # else: refused before submitting (e.g. a prompt too long)
                batcher.submit("second", batchable=True)

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        second = pool.submit(arriving_request)
        assert announced.wait(30)
        first = pool.submit(batcher.submit, "first", True)
        _wait_for(lambda: batcher.waiting == 1)
        time.sleep(0.2)
        assert not first.done()  # gathering: waiting for the announced request
        tokenized.set()
        assert first.result(timeout=30) == "first"
        second.result(timeout=30)
    assert batches == ([["first", "second"]] if submits else [["first"]])
    assert time.monotonic() - started < 10  # far from gather_seconds


def test_a_burst_arriving_a_few_ms_apart_shares_one_batch_and_runs_once_arrivals_pause():
    """Clients starting together reach the batcher spread over milliseconds: the first request expects nobody,
    yet keeps taking requests while each comes within linger_seconds of the one before (full: it runs at once);
    when they stop coming it runs linger_seconds after the last, not gather_seconds after the first."""
    batches: list[list[str]] = []
    batcher: Batcher[str, str] = Batcher(lambda items: batches.append(list(items)) or list(items), max_batch=4,
                                         gather_seconds=20, linger_seconds=0.5)

    def burst(names: list[str]) -> float:
        started = time.monotonic()
        with ThreadPoolExecutor(len(names)) as pool:
            futures = []
            for name in names:
                futures.append(pool.submit(batcher.submit, name, True))
                time.sleep(0.05)  # well within linger_seconds of the one before
            assert [future.result(timeout=30) for future in futures] == names
        return time.monotonic() - started

    assert burst(["a", "b", "c", "d"]) < 10 and batches == [["a", "b", "c", "d"]]
    batches.clear()
    batcher._load = 1  # a new burst after a lone client  # noqa: SLF001 - the state a lone client leaves
    assert burst(["e", "f"]) < 10 and batches == [["e", "f"]]  # arrivals paused: no wait for gather_seconds


def test_a_lone_client_waits_only_the_short_linger_never_gather_seconds(tokenizer):
    """With one client the batch is the request itself: it expects nobody, so gather_seconds never applies."""
    model = ScriptedModel([50, tokenizer.eos_token_id], tokenizer.eos_token_id)
    generator = TextGenerator(model, tokenizer, gather_seconds=5.0)
    client = TestClient(build_app(FixedModel(generator), "tiny@champion"))
    started = time.monotonic()
    for _ in range(3):
        assert client.post("/v1/completions", json={"prompt": "red", "max_tokens": 2}).status_code == 200
    assert time.monotonic() - started < 2.0 and model.batch_sizes == [1, 1, 1]


def test_shutting_the_server_down_with_batched_requests_in_flight_does_not_hang(tokenizer):
    """uvicorn's graceful shutdown lets the queued batch finish, then stops: the batcher has no thread to stop."""
    import json
    import urllib.request

    import uvicorn

    from tests.helpers.serving import free_port

    model = ScriptedModel([50, 51, tokenizer.eos_token_id], tokenizer.eos_token_id)
    generator = TextGenerator(model, tokenizer)
    gate = Gate(model)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(FixedModel(generator), "tiny@champion"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started)

    def call(_: int) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                         data=json.dumps({"prompt": "red", "max_tokens": 3}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status

    with ThreadPoolExecutor(8) as pool:
        statuses = pool.map(call, range(8))
        assert gate.entered.wait(30)
        _wait_for(lambda: gate.batch_sizes[0] + generator.batcher.waiting == 8)
        server.should_exit = True  # while all eight are in flight: they finish, then the server stops
        gate.open()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not stop"
        assert list(statuses) == [200] * 8
    # The first batch takes what arrived while it lingered (all eight when they came close enough together),
    # the second the rest: the shutdown waited for every one.
    assert len(gate.batch_sizes) <= 2 and sum(gate.batch_sizes) == 8


def test_serve_passes_max_batch_to_every_version_it_loads_and_refuses_zero(monkeypatch, tmp_path, capsys):
    from lora_pipeline import serving
    from lora_pipeline.cli import main

    loads = []

    class Follower:  # stands in for the registry: records how versions would be loaded, then stops `serve`
        def __init__(self, tracking_uri: str, reference: str, load) -> None:
            loads.append(load)
            raise LookupError("no registry here")

    monkeypatch.setattr(serving, "AliasFollower", Follower)
    config = ["--set", f"output_dir={tmp_path}"]
    assert main(["serve", "m@champion", "--max-batch", "3", *config]) == 2
    assert loads[0].func is serving.load_version and loads[0].keywords == {"max_batch": 3}
    assert main(["serve", "m@champion", "--max-batch", "0", *config]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err and len(loads) == 1
