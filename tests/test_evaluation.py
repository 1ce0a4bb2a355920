"""Evaluation scoring: exact match against the final assistant turn, stop-at-EOS rate, perplexity."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_pipeline.evaluation import EvalSuites, evaluate_model, normalize_answer, perplexity, score_generation_suite


class ScriptedModel(torch.nn.Module):
    """Answers each prompt with a scripted token sequence, like ``generate`` would."""

    def __init__(self, tokenizer, answers: list[list[int]]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.answers = answers
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        batch = []
        for _ in range(input_ids.shape[0]):
            tokens = self.answers[self.calls][:max_new_tokens]
            self.calls += 1
            batch.append(tokens + [kwargs["pad_token_id"]] * (max_new_tokens - len(tokens)))
        return torch.cat([input_ids, torch.tensor(batch)], dim=1)


def _row(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture()
def tokenizer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "left"
    return tok


def test_exact_match_and_stop_rate(tokenizer):
    eos = tokenizer.eos_token_id
    rows = [_row("repeat red cat", "red cat"), _row("repeat blue owl", "blue owl"), _row("repeat pink pig", "pink pig")]
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    answers = [enc("red cat") + [eos], enc("blue  owl "), enc("pink dog") + [eos]]
    scores = score_generation_suite(ScriptedModel(tokenizer, answers), tokenizer, rows, max_new_tokens=12, batch_size=2)
    # "blue  owl " matches after whitespace normalisation but never stopped; "pink dog" is wrong.
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["stop_rate"] == pytest.approx(2 / 3)
    assert scores["n"] == 3


def test_normalize_answer_collapses_whitespace():
    assert normalize_answer("  a \n b ") == "a b"


def test_perplexity_of_uniform_model_is_vocab_size(tokenizer, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # zero output weights: every next-token distribution is uniform
        model.lm_head.weight.zero_()
    ppl = perplexity(model, tokenizer, ["red cat", "the quick brown fox jumps"], batch_size=2, max_length=64)
    assert ppl == pytest.approx(model.config.vocab_size, rel=1e-4)


def test_evaluate_model_reports_every_suite(tokenizer, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    suites = EvalSuites(task=[_row("repeat red cat", "red cat")], regression_qa=[_row("repeat owl", "owl")],
                        regression_text=["red cat"])
    metrics = evaluate_model(model, tokenizer, suites, max_new_tokens=4, batch_size=4, max_length=64)
    assert set(metrics) == {"task_exact_match", "task_stop_rate", "task_n", "regression_exact_match",
                            "regression_stop_rate", "regression_n", "regression_perplexity"}
    assert math.isfinite(metrics["regression_perplexity"])
