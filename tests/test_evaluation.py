"""Evaluation scoring: exact match, token F1, ROUGE-L, stop-at-EOS and repetition rates, perplexities."""

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
    scores = score_generation_suite(ScriptedModel(tokenizer, answers), tokenizer, rows, max_new_tokens=12, batch_size=2,
                                    stop_ids=[eos])
    # "blue  owl " matches after whitespace normalisation but never stopped; "pink dog" is wrong.
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["stop_rate"] == pytest.approx(2 / 3)
    assert scores["n"] == 3


def test_normalize_answer_collapses_whitespace():
    assert normalize_answer("  a \n b ") == "a b"


def test_normalized_match_ignores_case_punctuation_and_articles():
    assert normalize_answer("The  capital is Paris.", "normalized") == normalize_answer("capital is paris", "normalized")
    assert normalize_answer("The capital is Paris.") != normalize_answer("capital is paris")


def test_generation_stops_at_any_stop_id_and_counts_it(tokenizer):
    # A Llama-3-style model ends a turn with one of several ids: the second stop id ends the answer too.
    eos = tokenizer.eos_token_id
    end_of_turn = tokenizer.convert_tokens_to_ids("<|user|>")  # stands in for <|eot_id|>
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [_row("repeat red cat", "red cat"), _row("repeat blue owl", "blue owl")]
    answers = [enc("red cat") + [end_of_turn] + enc("garbage after the turn"), enc("blue owl") + [eos]]
    model = ScriptedModel(tokenizer, answers)
    records: list[dict] = []
    scores = score_generation_suite(model, tokenizer, rows, max_new_tokens=12, batch_size=2,
                                    stop_ids=[eos, end_of_turn], records=records)
    assert scores["exact_match"] == 1.0 and scores["stop_rate"] == 1.0
    assert [r["answer"] for r in records] == ["red cat", "blue owl"]
    only_eos = score_generation_suite(ScriptedModel(tokenizer, answers), tokenizer, rows, max_new_tokens=12,
                                      batch_size=2, stop_ids=[eos])
    assert only_eos["stop_rate"] == 0.5 and only_eos["exact_match"] == 0.5  # rambles past its end of turn


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
    metrics = evaluate_model(model, tokenizer, suites, max_new_tokens=4, batch_size=4, max_length=64,
                             stop_ids=[tokenizer.eos_token_id])
    per_suite = ("exact_match", "token_f1", "rouge_l", "stop_rate", "repetition_rate", "n")
    assert set(metrics) == {f"{suite}_{key}" for suite in ("task", "regression") for key in per_suite} | {
        "regression_perplexity", "task_perplexity"}
    assert math.isfinite(metrics["task_perplexity"])
    assert math.isfinite(metrics["regression_perplexity"])


def test_token_f1_rouge_l_and_repetition_rate():
    from lora_pipeline.evaluation import repetition_rate, rouge_l, token_f1

    assert token_f1("red cat", "red cat") == 1.0
    assert token_f1("red dog", "red cat") == pytest.approx(0.5)
    assert token_f1("", "red cat") == 0.0 and token_f1("", "") == 1.0
    assert rouge_l("red blue cat", "red cat") == pytest.approx(2 * (2 / 3 * 1) / (2 / 3 + 1))
    assert rouge_l("owl", "red cat") == 0.0
    assert repetition_rate([1, 2, 3, 4]) == 0.0
    assert repetition_rate([7, 7, 7, 7, 7, 7]) == pytest.approx(3 / 4)  # 4 trigrams, 1 distinct
    assert repetition_rate([1, 2]) == 0.0


def test_suite_reports_f1_rouge_and_repetition(tokenizer):
    eos = tokenizer.eos_token_id
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [_row("repeat red cat", "red cat"), _row("say owl", "owl")]
    answers = [enc("red dog") + [eos], enc("owl owl owl owl owl owl")]
    scores = score_generation_suite(ScriptedModel(tokenizer, answers), tokenizer, rows, max_new_tokens=40, batch_size=2,
                                    stop_ids=[eos])
    assert scores["exact_match"] == 0.0
    assert scores["token_f1"] == pytest.approx((0.5 + 2 * (1 / 6) / (1 / 6 + 1)) / 2)
    assert 0 < scores["rouge_l"] < 1
    from lora_pipeline.evaluation import repetition_rate

    looping = repetition_rate(enc("owl owl owl owl owl owl"))
    assert looping > 0.3 and scores["repetition_rate"] == pytest.approx(looping / 2)
    assert scores["stop_rate"] == 0.5


def test_answer_perplexity_of_uniform_model_is_vocab_size(tokenizer, tiny_model_dir):
    from lora_pipeline.evaluation import answer_perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    rows = [_row("repeat red cat", "red cat"), _row("say a longer thing", "the quick brown fox")]
    ppl = answer_perplexity(model, tokenizer, rows, batch_size=2, max_length=64, stop_ids=[tokenizer.eos_token_id])
    assert ppl == pytest.approx(model.config.vocab_size, rel=1e-4)


def test_comparison_table_and_chart(tmp_path):
    from lora_pipeline.evaluation import comparison_table, write_comparison_chart

    results = {"base": {"task_exact_match": 0.0, "regression_perplexity": 12.0},
               "candidate": {"task_exact_match": 0.9, "regression_perplexity": 13.0, "task_perplexity": 2.0}}
    assert comparison_table(results) == {"regression_perplexity": {"base": 12.0, "candidate": 13.0},
                                         "task_exact_match": {"base": 0.0, "candidate": 0.9},
                                         "task_perplexity": {"candidate": 2.0}}
    chart = write_comparison_chart(results, tmp_path / "chart.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lm_eval_suite_is_skipped_with_a_message_when_unavailable(tokenizer, tiny_model_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as on a machine without lm-evaluation-harness
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    suites = EvalSuites(task=[_row("repeat red cat", "red cat")], regression_qa=[], regression_text=[],
                        lm_eval_tasks=("hellaswag",), lm_eval_limit=10)
    skipped: list[str] = []
    metrics = evaluate_model(model, tokenizer, suites, max_new_tokens=4, batch_size=4, max_length=64,
                             stop_ids=[tokenizer.eos_token_id], skipped=skipped)
    assert skipped == ["lm_eval:hellaswag skipped: lm-evaluation-harness is not installed "
                       "(pip install 'lora-pipeline[lm-eval]')"]
    assert "task_exact_match" in metrics and not any(k.startswith("lm_eval") for k in metrics)


def test_eval_suites_are_configurable(tmp_path):
    from lora_pipeline.config import ConfigError
    from lora_pipeline.config_files import load_config
    from lora_pipeline.suites import load_eval_suites

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    base = [f"data.eval_path={rows}", f"eval.regression_qa_path={rows}", "eval.regression_text_path=null"]
    suites = load_eval_suites(load_config(None, [*base, "eval.suites=[task, 'lm_eval:arc_easy']"]), tmp_path)
    assert (suites.score_task, suites.regression_qa, suites.lm_eval_tasks) == (True, [], ("arc_easy",))
    assert len(suites.task) == 1
    only_regression = load_eval_suites(load_config(None, [*base, "eval.suites=[regression]"]), tmp_path)
    assert not only_regression.score_task and len(only_regression.regression_qa) == 1
    with pytest.raises(ConfigError, match="unknown eval suites"):
        load_config(None, ["eval.suites=[tsk]"])


def test_base_answer_references_keep_an_empty_answer(tmp_path):
    # A base that stops at once gives an empty reference: it is a valid reference, not a broken row.
    from lora_pipeline.config_files import load_config
    from lora_pipeline.evaluation import Generation
    from lora_pipeline.suites import general_prompt_rows, load_eval_suites, write_references

    cfg = load_config(None, ["eval.regression_qa_path=base_answers", "eval.regression_text_path=null",
                             "eval.max_samples=2"])
    rows = general_prompt_rows(2)
    write_references(rows, [Generation("", True, 0.0), Generation("Tokyo.", True, 0.0)], tmp_path)
    loaded = load_eval_suites(cfg, tmp_path).regression_qa
    assert [row["messages"][-1]["content"] for row in loaded] == ["", "Tokyo."]
    assert [row["messages"][0] for row in loaded] == [row["messages"][0] for row in rows]
