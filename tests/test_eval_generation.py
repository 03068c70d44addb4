"""Generation evaluation: the answer metrics on hand-made cases, the held-out HaluEval questions, and the mechanics of
``run_generation_eval`` and ``mmrag eval`` (without ``--retrieval-only``) on a few HaluEval records with the tiny
random Llama (its answers are noise: the tests check how they are scored and reported, never how good they are)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import metrics
from eval.datasets import EvalRecord, halueval, halueval_held_out, resolve_gold
from eval.generation import DEFINITIONS, score_answer, strip_citations
from mmrag.errors import BadInputError

# -- answer metrics -----------------------------------------------------------------------------------------------


def test_normalize_answer():
    assert metrics.normalize_answer("The Arthur's Magazine!") == "arthurs magazine"
    assert metrics.normalize_answer("Arthur\u2019s  Magazine (1844\u20131846).") == "arthurs magazine 1844 1846"
    assert metrics.normalize_answer("A  cat, an owl and THE dog") == "cat owl and dog"
    assert metrics.normalize_answer("theatre anthem") == "theatre anthem"  # articles only as whole words
    assert metrics.normalize_answer("?!") == ""


def test_answer_contains():
    assert metrics.answer_contains("The head office is in Delhi, India.", "Delhi") == 1.0
    assert metrics.answer_contains("It was ARTHUR\u2019S magazine", "Arthur's Magazine") == 1.0
    assert metrics.answer_contains("the magazine of Arthur", "Arthur's Magazine") == 0.0
    assert metrics.answer_contains("First for Women", "Arthur's Magazine") == 0.0
    # Word boundaries: a gold answer inside a longer word or number is not contained.
    assert metrics.answer_contains("in 19645", "1964") == 0.0
    assert metrics.answer_contains("in 1964.", "1964") == 1.0
    assert metrics.answer_contains("Nevadan", "Nevada") == 0.0
    with pytest.raises(ValueError, match="empty once normalised"):
        metrics.answer_contains("anything", "The.")


def test_token_f1():
    assert metrics.token_f1("Delhi", "Delhi") == 1.0
    # "delhi india" vs "delhi": precision 1/2, recall 1/1 -> F1 2/3.
    assert metrics.token_f1("Delhi, India", "Delhi") == pytest.approx(2 / 3)
    # "sir francis nethersole" vs "francis nethersole was born": 2 shared; P = 2/3, R = 2/4 -> 4/7.
    assert metrics.token_f1("Sir Francis Nethersole", "Francis Nethersole was born") == pytest.approx(4 / 7)
    # Shared tokens count with multiplicity: "new new york" vs "new york": 2 shared, P 2/3, R 1 -> 0.8.
    assert metrics.token_f1("new new york", "New York") == pytest.approx(0.8)
    assert metrics.token_f1("Mumbai", "Delhi") == 0.0
    assert metrics.token_f1("The", "a") == 1.0 and metrics.token_f1("", "Delhi") == 0.0


def test_citation_precision():
    gold = {"/kb/passage-00001.txt"}
    assert metrics.citation_precision(["/kb/passage-00001.txt"], gold) == 1.0
    assert metrics.citation_precision(["/kb/passage-00001.txt", "/kb/passage-00004.txt"], gold) == 0.5
    assert metrics.citation_precision(["/kb/passage-00004.txt"] * 3, gold) == 0.0
    assert metrics.citation_precision([], gold) is None  # nothing cited: no precision, not a precision of 0
    with pytest.raises(ValueError, match="gold ids are empty"):
        metrics.citation_precision(["a"], set())


def test_score_answer_ignores_citation_markers():
    assert strip_citations("It was Delhi [1]. Founded in 1934 [2, 3][4-5].") == "It was Delhi. Founded in 1934."
    assert score_answer("Delhi [1].", "Delhi") == {"correct": 1.0, "f1": 1.0}
    # Without stripping, "[1]" would add a token "1" and halve precision.
    assert score_answer("Delhi, India [1]", "Delhi") == {"correct": 1.0, "f1": 0.6667}
    assert score_answer("[2] 1964", "1964")["correct"] == 1.0


# -- held-out HaluEval questions ----------------------------------------------------------------------------------


def test_halueval_held_out(tmp_path, shared):
    rows = [("P1", "q0", "a0"), ("P2", "q1", "a1"), ("P3", "q2", "a2"), ("P1 ", "q3", "a3"), ("P4", "q4", "a4"),
            ("P4", "q5", "a5"), ("P5", "q6", "a6")]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"knowledge": k, "question": q, "right_answer": a, "id": f"r{i}"}) + "\n"
                            for i, (k, q, a) in enumerate(rows)))
    # r3's passage equals r0's up to whitespace: it is answerable from the first three, so it is skipped.
    held = halueval_held_out(path, 3, 3)
    assert [r.id for r in held] == ["r4", "r5", "r6"]
    assert held[0] == EvalRecord(id="r4", prompt="q4", gold_answer="a4", tags=("halueval", "qa", "unanswerable"))
    assert [r.id for r in halueval_held_out(path, 3, 10)] == ["r4", "r5", "r6"]  # the file ends
    assert [r.id for r in halueval_held_out(path, 0, 2)] == ["r0", "r1"]
    # On the real file: none of the held-out passages is among the first ten.
    qa = shared / "halueval" / "qa_dev.jsonl"
    raw = [json.loads(line) for line in qa.open()]
    held = halueval_held_out(qa, 10, 5)
    assert [r.id for r in held] == [raw[i]["id"] for i in range(10, 15)]
    corpus = {" ".join(r["knowledge"].split()) for r in raw[:10]}
    by_id = {r["id"]: r for r in raw}
    assert all(" ".join(by_id[r.id]["knowledge"].split()) not in corpus and not r.gold_sources for r in held)


# -- run_generation_eval ------------------------------------------------------------------------------------------


@pytest.fixture
def halueval_generation_kb(shared, make_runtime, tiny_llm, tmp_path):
    """Four HaluEval questions with their passages ingested, two later questions without theirs; the tiny LLM."""
    qa = shared / "halueval" / "qa_dev.jsonl"
    records, build = halueval(qa, limit=4)
    corpus = build(tmp_path / "corpus")
    runtime = make_runtime(clip=False, llm=tiny_llm, generation={"max_new_tokens": 12})
    report = runtime.ingestor.ingest(list(corpus.files))
    assert report.added == 4 and not report.failed
    return runtime, resolve_gold(records, corpus.root), halueval_held_out(qa, 4, 2)


def test_run_generation_eval_mechanics(halueval_generation_kb):
    from eval.generation import run_generation_eval

    runtime, records, held = halueval_generation_kb
    report = run_generation_eval(runtime, records, unanswerable=held, baseline=True, progress=False)
    assert set(report) == {"config", "definitions", "rag", "baseline", "unanswerable", "examples"}
    assert report["definitions"] == DEFINITIONS
    config = report["config"]
    assert config["model"] == "tiny-random-llama" and config["sampling"]["max_new_tokens"] == 12
    assert config["decoder"] == "lean, fp32 weights"  # the CPU default, recorded so runs can be compared
    assert config["records"] == 4 and config["unanswerable"] == 2 and config["baseline"] is True
    assert config["retrieval"]["threshold"] == runtime.settings.retrieval.threshold

    examples = report["examples"]
    assert [e["id"] for e in examples] == [r.id for r in records] + [r.id for r in held]
    answerable = [e for e in examples if e["answerable"]]
    assert all("baseline" in e for e in answerable) and not any("baseline" in e for e in examples[4:])
    for example, record in zip(answerable, records):
        rag = example["rag"]
        assert example["gold"] == list(record.gold_sources) and example["gold_answer"] == record.gold_answer
        # Every question's own passage is in the knowledge base and close to it: the model is asked.
        assert rag["abstain_reason"] != "no-grounding" and rag["best_dense"] >= config["retrieval"]["threshold"]
        assert rag["latency_s"] > 0 and 0 < rag["completion_tokens"] <= 12
        assert any(s["gold"] for s in rag["sources"])
        if not rag["abstained"]:
            assert rag["gold_in_sources"] is True
            assert rag["correct"] == metrics.answer_contains(strip_citations(rag["text"]), record.gold_answer)
            assert rag["cited_gold"] == any(c["gold"] for c in rag["citations"])
            assert all(c["gold"] == (c["source"] in record.gold_sources) for c in rag["citations"])
            assert len(rag["unsupported"]) <= rag["sentences"]
        base = example["baseline"]
        assert base["correct"] == metrics.answer_contains(base["text"], record.gold_answer)
        assert base["f1"] == round(metrics.token_f1(base["text"], record.gold_answer), 4)

    # The aggregates are those of the examples.
    rag = report["rag"]
    entries = [e["rag"] for e in answerable]
    answered = [e for e in entries if not e["abstained"]]
    citations = [c for e in answered for c in e["citations"]]
    assert rag["n"] == 4 and rag["answered"] == len(answered)
    assert rag["accuracy"] == pytest.approx(sum(e["correct"] for e in entries) / 4, abs=1e-4)
    assert rag["token_f1"] == pytest.approx(sum(e["f1"] for e in entries) / 4, abs=1e-4)
    assert rag["citations"] == len(citations)
    assert rag["citation_precision"] == (round(sum(c["gold"] for c in citations) / len(citations), 4)
                                         if citations else None)
    if answered:
        assert rag["citation_recall"] == round(sum(e["cited_gold"] for e in answered) / len(answered), 4)
    sentences = sum(e["sentences"] for e in answered)
    assert rag["sentences"] == sentences
    assert rag["unsupported_sentence_rate"] == (round(rag["unsupported_sentences"] / sentences, 4)
                                                if sentences else None)
    assert rag["abstention_rate"] == pytest.approx((4 - len(answered)) / 4, abs=1e-4)
    assert rag["latency_s"]["p50"] > 0 and report["baseline"]["n"] == 4
    assert report["baseline"]["accuracy"] == pytest.approx(
        sum(e["baseline"]["correct"] for e in answerable) / 4, abs=1e-4)

    # Unanswerable questions: their passages are absent. A question abstains without calling the model exactly when
    # no retrieved passage reaches the threshold (what MiniLM scores here decides which, not the random model).
    threshold = config["retrieval"]["threshold"]
    held_entries = [e["rag"] for e in examples[4:]]
    for entry in held_entries:
        below = entry["best_dense"] < threshold
        assert (entry["abstain_reason"] == "no-grounding") == below
        if below:
            assert entry["abstained"] and entry["completion_tokens"] == 0 and entry["sources"] == []
            assert entry["text"] == "The knowledge base does not cover this."
    summary = report["unanswerable"]
    no_grounding = sum(e["abstain_reason"] == "no-grounding" for e in held_entries)
    assert summary["n"] == 2 and summary["abstained"]["no-grounding"] == no_grounding
    assert summary["by_reason"]["no-grounding"] == no_grounding / 2
    assert summary["answered"] == sum(not e["abstained"] for e in held_entries)
    json.dumps(report)  # the report is JSON as it is


def test_run_generation_eval_input_errors():
    """Records are checked before the runtime is used."""
    from eval.generation import run_generation_eval

    gold = ("/kb/passage-00000.txt",)
    with pytest.raises(BadInputError, match="no records to evaluate"):
        run_generation_eval(None, [], progress=False)
    with pytest.raises(BadInputError, match="has no gold answer"):
        run_generation_eval(None, [EvalRecord(id="x", prompt="q", gold_sources=gold)], progress=False)
    with pytest.raises(BadInputError, match="has no gold answer"):  # "The" is empty once normalised
        run_generation_eval(None, [EvalRecord(id="x", prompt="q", gold_answer="The", gold_sources=gold)],
                            progress=False)
    with pytest.raises(BadInputError, match="has no gold sources or gold images"):
        run_generation_eval(None, [EvalRecord(id="x", prompt="q", gold_answer="Delhi")], progress=False)
    with pytest.raises(BadInputError, match="gold paths must be absolute"):
        run_generation_eval(None, [EvalRecord(id="x", prompt="q", gold_answer="Delhi", gold_sources=("a.txt",))],
                            progress=False)
    record = EvalRecord(id="x", prompt="q", gold_answer="Delhi", gold_sources=gold)
    with pytest.raises(BadInputError, match="ids must be unique"):
        run_generation_eval(None, [record], unanswerable=[record], progress=False)


# -- mmrag eval (generation) --------------------------------------------------------------------------------------


def test_eval_command_generation(shared, tmp_path, text_embedder, tiny_llm):
    """``eval_command`` as ``mmrag eval halueval --baseline --unanswerable 2 --limit 3`` runs it, with the entry
    point's runtime factory swapped for one sharing the session's models."""
    from rich.console import Console

    from eval.cli import eval_command, merge_overrides, summary_table
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    def factory(**overrides):
        settings = load_settings(**merge_overrides({"data_dir": tmp_path / "data"}, overrides))
        return Runtime(settings, ModelSet(settings, text_embedder=text_embedder, clip=None, llm=tiny_llm))

    qa = shared / "halueval" / "qa_dev.jsonl"
    outcome = eval_command(factory, "halueval", qa, 3, tmp_path / "out", False, True, baseline=True, unanswerable=2,
                           max_new_tokens=8)
    report = outcome.report
    assert outcome.path == (tmp_path / "out" / "report.json").resolve()
    assert json.loads(outcome.path.read_text()) == report
    assert report["dataset"]["records"] == 3 and report["dataset"]["unanswerable"] == 2
    assert report["corpus"]["files"] == 3  # the unanswerable questions' passages are not ingested
    assert report["config"]["retrieval_only"] is False and list(report["modes"]) == ["dense", "bm25", "hybrid"]
    generation = report["generation"]
    assert generation["config"]["sampling"]["max_new_tokens"] == 8  # the eval's setting, not the profile's 160
    assert generation["rag"]["n"] == 3 and generation["baseline"]["n"] == 3 and generation["unanswerable"]["n"] == 2
    assert len(generation["examples"]) == 5 and generation["definitions"] == DEFINITIONS
    # The summary is the report without per-example data or definitions.
    summary = outcome.summary
    assert "examples" not in summary and set(summary["generation"]) == {"config", "rag", "baseline",
                                                                        "unanswerable"}
    assert summary["report"] == str(outcome.path)
    console = Console(file=io.StringIO(), width=200)
    console.print(summary_table(outcome))
    text = console.file.getvalue()
    assert "retrieval on halueval (3 prompts" in text and "generation on halueval (tiny-random-llama" in text
    assert "baseline (no retrieval)" in text and "unanswerable (passage not ingested)" in text


def test_eval_command_option_errors(shared, tmp_path):
    from eval.cli import eval_command

    def factory(**overrides):  # every error below comes before a runtime is built
        raise AssertionError("no runtime should be built")

    qa = shared / "halueval" / "qa_dev.jsonl"
    with pytest.raises(BadInputError, match="drop --retrieval-only"):
        eval_command(factory, "halueval", qa, 3, None, True, True, baseline=True)
    with pytest.raises(BadInputError, match="--unanswerable works with halueval"):
        eval_command(factory, "tuxpaint", shared / "tuxpaint", 3, None, False, True, unanswerable=2)
    with pytest.raises(BadInputError, match="have no gold_answer"):
        eval_command(factory, "tuxpaint", shared / "tuxpaint", 3, None, False, True)
    with pytest.raises(BadInputError, match="--max-new-tokens must be at least 1"):
        eval_command(factory, "halueval", qa, 3, None, False, True, max_new_tokens=0)
    with pytest.raises(BadInputError, match="--unanswerable must be at least 0"):
        eval_command(factory, "halueval", qa, 3, None, False, True, unanswerable=-1)


def test_cli_eval_generation_options(tmp_path):
    env = {**os.environ, "MMRAG_DATA_DIR": str(tmp_path / "data")}
    run = subprocess.run([sys.executable, "-m", "mmrag.cli", "eval", "halueval", "--retrieval-only", "--baseline",
                          "--corpus", "x.jsonl"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert run.returncode == 5 and "--baseline and --unanswerable evaluate generation" in run.stderr
    assert not Path(tmp_path / "data").exists()
