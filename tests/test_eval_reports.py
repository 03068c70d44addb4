"""Hallucination evaluation runs: support and detector metrics against hand-computed values, the support scorer
backends (a contract every implementation runs, the cross-encoder through the real loading path with tiny random
models), the detector on HaluEval pairs, gates and run comparison, resumable runs (a real ``mmrag eval`` killed with
SIGKILL, then rerun), the HTML report in headless Chromium, and a full small run with the real MiniLM and SmolLM2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval import metrics
from eval.datasets import load_jsonl
from eval.detector import DetectorPair, halueval_pairs, run_detector_eval, sentence_form
from eval.gate import EXIT_GATE_FAILED, check_gates, compare_reports, gate_metrics, metric_names, parse_thresholds
from eval.runstate import RunState
from generation.support import CrossEncoderSupportScorer, LexicalSupportScorer, score_pairs
from mmrag.errors import BadInputError, ConfigError, ModelUnavailableError

# -- metrics ------------------------------------------------------------------------------------------------------


def test_faithfulness_and_hallucination_rate():
    assert metrics.faithfulness([True, False, True, True]) == 0.75
    assert metrics.faithfulness([False]) == 0.0
    assert metrics.faithfulness([]) is None  # nothing checked: no faithfulness, not a faithfulness of 0
    # Three answers: one with an unsupported sentence, one fully supported, one with no checked sentence.
    assert metrics.hallucination_rate([[True, False], [True, True], []]) == pytest.approx(1 / 3)
    assert metrics.hallucination_rate([[False], [False, True]]) == 1.0
    assert metrics.hallucination_rate([]) is None


def test_citation_recall():
    assert metrics.citation_recall(["a", "x", "a"], {"a", "b"}) == 0.5
    assert metrics.citation_recall([], {"a"}) == 0.0
    assert metrics.citation_recall(["b", "a"], {"a", "b"}) == 1.0
    with pytest.raises(ValueError, match="gold ids are empty"):
        metrics.citation_recall(["a"], set())


def test_auroc_f1_and_best_threshold():
    # Positives 0.9, 0.3; negatives 0.8, 0.3. Pairs: 0.9>0.8 (1), 0.9>0.3 (1), 0.3<0.8 (0), 0.3=0.3 (1/2): 2.5/4.
    assert metrics.auroc([0.9, 0.8, 0.3, 0.3], [1, 0, 1, 0]) == 0.625
    assert metrics.auroc([0.9, 0.7, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert metrics.auroc([0.1, 0.2, 0.7, 0.9], [1, 1, 0, 0]) == 0.0
    assert metrics.auroc([0.5] * 4, [1, 0, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="one positive and one negative"):
        metrics.auroc([0.1, 0.2], [1, 1])
    # TP 2, FP 1, FN 1 -> 2*2 / (4 + 1 + 1) = 2/3.
    assert metrics.binary_f1([True, True, True, False, False], [True, True, False, True, False]) == pytest.approx(2 / 3)
    assert metrics.binary_f1([False, False], [True, False]) == 0.0
    # Flag negatives as score < t. Scores 0.9 (pos), 0.2 (neg), 0.5 (pos), 0.1 (neg): t = 0.5 flags exactly the two
    # negatives (F1 1.0); the lowest such threshold among the candidates (the distinct scores) wins.
    assert metrics.best_threshold([0.9, 0.2, 0.5, 0.1], [1, 0, 1, 0]) == (0.5, 1.0)
    # Every score equal: only flagging everything catches the negatives: TP 1, FP 1 -> F1 2/3.
    threshold, f1 = metrics.best_threshold([0.4, 0.4], [1, 0])
    assert threshold > 0.4 and f1 == pytest.approx(2 / 3)


# -- the JSONL loader: one bad line never stops the rest ----------------------------------------------------------


def test_jsonl_bad_lines_are_reported_and_the_rest_loads(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "q1", "prompt": "When?", "gold_answer": "1964", "gold_sources": ["a.md"]}),
        '{"prompt": "broken',
        json.dumps({"id": "q3", "prompt": "Which?", "gold_image": ["img.png"]}),
        json.dumps({"id": "q1", "prompt": "Again?"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "q6", "prompt": "Last?", "tags": ["x"]}),
    ]) + "\n")
    problems: list[str] = []
    records = load_jsonl(path, problems=problems)
    assert [r.id for r in records] == ["q1", "q6"]
    assert len(problems) == 4
    assert problems[0].endswith("set.jsonl:2: not valid JSON (Unterminated string starting at)")
    assert "set.jsonl:3: unknown keys ['gold_image']" in problems[1]
    assert "set.jsonl:4: duplicate id 'q1'" in problems[2]
    assert "set.jsonl:5: expected a JSON object, got list" in problems[3]
    # Without a problems list the first bad line raises; a set with no good line raises, naming its first problem.
    with pytest.raises(BadInputError, match="set.jsonl:2: not valid JSON"):
        load_jsonl(path)
    path.write_text('{"prompt": ""}\n{"x": 1}\n')
    with pytest.raises(BadInputError, match="holds no records: .*'prompt' must be a non-empty string.*1 more bad"):
        load_jsonl(path, problems=[])


# -- support scorers ----------------------------------------------------------------------------------------------


def _save_classifier(folder: Path, tokenizer, num_labels: int, id2label: dict[int, str] | None = None) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=num_labels,
                        **({"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
                           if id2label else {}))
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_folders(tmp_path_factory, text_embedder) -> dict[str, Path]:
    """Tiny random sequence classifiers with MiniLM's vocabulary: a one-logit detector (HHEM-like) and a
    three-label NLI model (tests only)."""
    root = tmp_path_factory.mktemp("support-scorers")
    tokenizer = text_embedder.tokenizer
    return {
        "single": _save_classifier(root / "single", tokenizer, 1),
        "nli": _save_classifier(root / "nli", tokenizer, 3, {0: "contradiction", 1: "neutral", 2: "entailment"}),
    }


def _load_scorer(folder: Path | None = None, **spec):
    from mmrag.config import load_settings
    from mmrag.models import ModelSet

    if folder is not None:  # the default profile's role names the lexical backend: a model replaces it
        spec = {"path": str(folder), "backend": None, **spec}
    settings = load_settings(models={"support_scorer": spec})
    return ModelSet(settings).support_scorer


@pytest.fixture(scope="module", params=["lexical", "cross-encoder", "nli"])
def any_scorer(request, classifier_folders):
    if request.param == "lexical":
        return _load_scorer(backend="lexical")
    return _load_scorer(classifier_folders["single" if request.param == "cross-encoder" else "nli"])


def test_support_scorer_contract(any_scorer, request):
    """What every SupportScorer implementation must do: a name; a score in [0, 1] for any claim and evidence, the
    same every time; a batch equals one call per item."""
    kind = request.node.callspec.params["any_scorer"]
    assert isinstance(any_scorer, LexicalSupportScorer if kind == "lexical" else CrossEncoderSupportScorer)
    assert isinstance(any_scorer.name, str) and any_scorer.name
    items = [("Delhi is the capital of India.", ["New Delhi is the capital of India.", "Mumbai is a port."]),
             ("The magazine started in 1844.", ["Arthur's Magazine (1844-1846) was an American literary periodical."]),
             ("Nothing here matches.", ["Completely unrelated text about cars."]),
             ("A claim without evidence.", []),
             ("", ["Some passage."])]
    single = [any_scorer.score(claim, evidence) for claim, evidence in items]
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in single)
    assert [any_scorer.score(c, e) for c, e in items] == single
    assert score_pairs(any_scorer, items) == pytest.approx(single, abs=1e-5)


def test_lexical_scorer_values():
    scorer = _load_scorer(backend="lexical")
    assert isinstance(scorer, LexicalSupportScorer)
    # Content words of the claim: delhi, capital, india; all three are in the passage.
    assert scorer.score("Delhi is the capital of India.", ["New Delhi is the capital of India."]) == 1.0
    # magazine, started, 1844 vs a passage holding "magazine" and "1844" only: 2/3.
    assert scorer.score("The magazine started in 1844.", ["Arthur's Magazine, 1844"]) == pytest.approx(2 / 3)


def test_cross_encoder_support_scorer_loading(classifier_folders, tmp_path):
    import torch

    single = _load_scorer(classifier_folders["single"], name="tiny-hhem")
    assert isinstance(single, CrossEncoderSupportScorer) and single.support_index is None
    assert single.name == "tiny-hhem"
    nli = _load_scorer(classifier_folders["nli"])
    assert isinstance(nli, CrossEncoderSupportScorer) and nli.support_index == 2  # "entailment"
    # The score is the model's probability, computed the documented way: softmax over labels, the entailment one.
    premise, claim = "New Delhi is the capital of India.", "Delhi is the capital."
    encoded = nli.tokenizer([premise], [claim], return_tensors="pt", truncation=True)
    with torch.inference_mode():
        expected = torch.softmax(nli.model(**encoded).logits.float(), dim=-1)[0, 2].item()
    assert nli.score(claim, [premise]) == pytest.approx(expected, abs=1e-5)
    # Several passages: the best one counts.
    other = "Cars are fast."
    assert nli.score(claim, [other, premise]) == pytest.approx(max(nli.score(claim, [other]), expected), abs=1e-5)
    # An explicit label; a label the model lacks; an unknown backend; a folder that does not exist.
    assert _load_scorer(classifier_folders["nli"], options={"support_label": "neutral"}).support_index == 1
    with pytest.raises(ConfigError, match="'supports' is not one of the model's labels"):
        _load_scorer(classifier_folders["nli"], options={"support_label": "supports"})
    with pytest.raises(ConfigError, match="backend 'nli' is unknown"):
        _load_scorer(backend="nli")
    with pytest.raises(ModelUnavailableError, match="support_scorer.*does not exist"):
        _load_scorer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="cannot load the support scorer"):
        _load_scorer(tmp_path / "empty")


# -- the support scorer as a detector -----------------------------------------------------------------------------


def test_sentence_form():
    assert sentence_form("Which magazine was started first?", "Arthur's Magazine") == \
        "The answer to Which magazine was started first is Arthur's Magazine."
    assert sentence_form("Who won ?", "  Sir  Francis was born there. ") == \
        "The answer to Who won is Sir Francis was born there."


def test_detector_on_hand_made_pairs():
    pairs = [DetectorPair("p1", "Where is the office?", "The head office is in Delhi, India.", "Delhi",
                          "The head office is in Mumbai."),
             DetectorPair("p2", "When did it open?", "It opened in 1964 in Paris.", "1964", "It opened in 1971.")]
    report = run_detector_eval(LexicalSupportScorer(), pairs, threshold=0.5, progress=False)
    # Raw: "Delhi" 1/1; "head office mumbai" -> head, office present, mumbai not: 2/3. "1964" 1; "opened 1971": 1/2.
    assert report["examples"][0]["raw"] == {"right": 1.0, "hallucinated": 0.6667}
    assert report["examples"][1]["raw"] == {"right": 1.0, "hallucinated": 0.5}
    raw = report["forms"]["raw"]
    assert raw["auroc"] == 1.0 and raw["n"] == 2
    # At 0.5 nothing is below the threshold: no hallucination flagged, F1 0, recall 0, no precision.
    assert raw["f1"] == 0.0 and raw["recall"] == 0.0 and raw["precision"] is None
    assert raw["best_f1"] == 1.0 and raw["best_threshold"] == 1.0
    assert raw["mean_right"] == 1.0 and raw["mean_hallucinated"] == pytest.approx((2 / 3 + 0.5) / 2, abs=1e-4)
    # Sentence form: "answer office delhi" vs the passage (answer missing): 2/3; "answer office head mumbai": 2/4.
    assert report["examples"][0]["sentence"] == {"right": 0.6667, "hallucinated": 0.5}
    assert set(report["forms"]) == {"raw", "sentence"} and report["config"]["scorer"] == "lexical"
    with pytest.raises(BadInputError, match="unknown detector form"):
        run_detector_eval(LexicalSupportScorer(), pairs, forms=("short",), progress=False)


def test_detector_on_halueval(shared):
    """The lexical scorer on 200 HaluEval pairs: the raw pairs are easy for it (length and overlap give them away);
    in one sentence form it does much worse."""
    pairs = halueval_pairs(shared / "halueval" / "qa_dev.jsonl", limit=200)
    report = run_detector_eval(LexicalSupportScorer(), pairs, progress=False)
    raw, same = report["forms"]["raw"], report["forms"]["sentence"]
    assert raw["n"] == same["n"] == 200 and len(report["examples"]) == 200
    assert raw["auroc"] > 0.8 and same["auroc"] < raw["auroc"] - 0.1
    scores = [e["raw"]["right"] for e in report["examples"]] + [e["raw"]["hallucinated"] for e in report["examples"]]
    assert raw["auroc"] == pytest.approx(metrics.auroc(scores, [1] * 200 + [0] * 200), abs=1e-4)


# -- gates and compare --------------------------------------------------------------------------------------------


def _report(hybrid_recall: float, accuracy: float, hallucination: float | None) -> dict:
    return {"modes": {"hybrid": {"n": 3, "recall@5": hybrid_recall, "mrr": 0.5, "latency_ms": {"p50": 1.0}}},
            "generation": {"rag": {"accuracy": accuracy, "hallucination_rate": hallucination,
                                   "citation_precision": None},
                           "baseline": {"accuracy": 0.1}}}


def test_gates():
    valid = metric_names(generation=True, baseline=True)
    assert "retrieval.hybrid.recall@5" in valid and "rag.faithfulness" in valid and "baseline.accuracy" in valid
    assert "detector.raw.auroc" not in valid and "detector.raw.auroc" in metric_names(detector=True)
    thresholds = (parse_thresholds(["retrieval.hybrid.recall@5=0.9", "rag.citation_precision=0.5"], "under", valid)
                  + parse_thresholds(["rag.hallucination_rate=0.3"], "over", valid))
    results = check_gates(_report(0.95, 0.3, 0.4), thresholds)
    assert [(g["metric"], g["passed"]) for g in results] == [
        ("retrieval.hybrid.recall@5", True), ("rag.citation_precision", False), ("rag.hallucination_rate", False)]
    assert results[1]["reason"] == "not measured in this run" and results[2]["reason"] == "0.4000 > 0.3"
    with pytest.raises(BadInputError, match="unknown metric 'recall@5' for this run; valid metrics: retrieval.dense"):
        parse_thresholds(["recall@5=0.9"], "under", valid)
    with pytest.raises(BadInputError, match="expected METRIC=VALUE"):
        parse_thresholds(["rag.accuracy"], "under", valid)
    with pytest.raises(BadInputError, match="'high' is not a number"):
        parse_thresholds(["rag.accuracy=high"], "under", valid)


def test_compare_reports():
    rows = compare_reports(_report(0.9, 0.2, 0.5), _report(0.95, 0.3, None))
    by_name = {r["metric"]: r for r in rows}
    assert by_name["retrieval.hybrid.recall@5"]["delta"] == 0.05
    assert by_name["rag.accuracy"] == {"metric": "rag.accuracy", "a": 0.2, "b": 0.3, "delta": 0.1}
    assert by_name["rag.hallucination_rate"]["delta"] is None and by_name["rag.hallucination_rate"]["a"] == 0.5
    assert "retrieval.hybrid.latency_ms" not in by_name and "retrieval.hybrid.n" not in by_name
    assert gate_metrics({}) == {}


# -- run state ----------------------------------------------------------------------------------------------------


def test_run_state_resume_refuse_fresh(tmp_path):
    folder = tmp_path / "run"
    config = {"dataset": "halueval", "limit": 3, "settings": {"generation": {"max_new_tokens": 8}}}
    state = RunState.open(folder, config)
    assert not state.resumed and state.finished("generation") == {}
    record = state.recorder("generation")
    record("a", {"id": "a", "x": 1})
    record("b", {"id": "b", "x": 2})
    # A kill mid-write leaves a torn last line: it is dropped, and the next record starts on a line of its own.
    with (folder / "examples.jsonl").open("a") as handle:
        handle.write('{"stage": "generation", "id": "c", "exam')
    again = RunState.open(folder, config)
    assert again.resumed and again.resumed_count == {"generation": 2}
    assert set(again.finished("generation")) == {"a", "b"}
    again.recorder("generation")("c", {"id": "c"})
    lines = [json.loads(line) for line in (folder / "examples.jsonl").read_text().splitlines()]
    assert [item["id"] for item in lines] == ["a", "b", "c"]
    # Another configuration is refused, naming what differs; --fresh starts over.
    other = {**config, "settings": {"generation": {"max_new_tokens": 16}}}
    with pytest.raises(BadInputError, match=r"another configuration \(differs in: settings.generation.max_new_tokens\)"
                                            r".*add --fresh"):
        RunState.open(folder, other)
    fresh = RunState.open(folder, other, fresh=True)
    assert not fresh.resumed and not (folder / "examples.jsonl").exists()
    assert json.loads((folder / "run.json").read_text())["config"] == other


# -- the command line: detector, gates, compare ---------------------------------------------------------------------


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "MMRAG_DATA_DIR": str(cwd / "data"), **env}
    return subprocess.run([sys.executable, "-m", "mmrag.cli", *args], capture_output=True, text=True,
                          env=environment, timeout=600, cwd=cwd)


def test_cli_detector_gates_and_compare(shared, tmp_path):
    qa = str(shared / "halueval" / "qa_dev.jsonl")
    base = ["eval", "halueval", "--detector", "--corpus", qa]
    ok = _cli([*base, "--limit", "100", "--out", str(tmp_path / "a"), "--json",
               "--fail-under", "detector.raw.auroc=0.6", "--fail-over", "detector.sentence.best_f1=1"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["detector"]["config"]["pairs"] == 100 and "examples" not in summary["detector"]
    assert [g["passed"] for g in summary["gates"]] == [True, True]
    assert (tmp_path / "a" / "report.html").is_file() and (tmp_path / "a" / "report.json").is_file()
    failed = _cli([*base, "--limit", "50", "--out", str(tmp_path / "b"),
                   "--fail-under", "detector.sentence.auroc=0.99"], tmp_path)
    assert failed.returncode == EXIT_GATE_FAILED
    assert "gate failed: detector.sentence.auroc >= 0.99:" in failed.stderr and "FAILED" in failed.stdout
    unknown = _cli([*base, "--fail-under", "rag.accuracy=0.5"], tmp_path)
    assert unknown.returncode == 5
    assert "unknown metric 'rag.accuracy' for this run; valid metrics: detector.raw.auroc" in unknown.stderr
    compared = _cli(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b" / "report.json"), "--json"], tmp_path)
    assert compared.returncode == 0, compared.stderr
    rows = {r["metric"]: r for r in json.loads(compared.stdout)["metrics"]}
    a = json.loads((tmp_path / "a" / "report.json").read_text())["detector"]["forms"]["raw"]["auroc"]
    b = json.loads((tmp_path / "b" / "report.json").read_text())["detector"]["forms"]["raw"]["auroc"]
    assert rows["detector.raw.auroc"] == {"metric": "detector.raw.auroc", "a": a, "b": b, "delta": round(b - a, 4)}
    # The table form, and what compare refuses (in process: the same functions the command calls).
    import io

    from rich.console import Console

    from eval.cli import compare_command, compare_table

    console = Console(file=io.StringIO(), width=200)
    console.print(compare_table(compare_command(tmp_path / "a", tmp_path / "b")))
    assert "detector.sentence.auroc" in console.file.getvalue() and "B - A" in console.file.getvalue()
    with pytest.raises(BadInputError, match="is not a report"):
        compare_command(tmp_path / "a", tmp_path / "nope")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(BadInputError, match="holds any metric"):
        compare_command(tmp_path / "empty.json", tmp_path / "empty.json")


# -- resume after a kill --------------------------------------------------------------------------------------------


def test_cli_run_resumes_after_sigkill(shared, tmp_path, tiny_llm_folder):
    """A real ``mmrag eval`` (MiniLM, milvus-lite, the tiny random Llama) killed with SIGKILL in the middle of its
    generation stage, then run again: it finishes, and every example is there exactly once."""
    qa = str(shared / "halueval" / "qa_dev.jsonl")
    out = tmp_path / "run"
    args = ["eval", "halueval", "--corpus", qa, "--limit", "8", "--baseline", "--max-new-tokens", "16", "--out",
            str(out), "--json"]
    env = {**os.environ, "MMRAG_DATA_DIR": str(tmp_path / "data"), "MMRAG_MODELS__LLM__PATH": str(tiny_llm_folder)}
    examples = out / "examples.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "mmrag.cli", *args], env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    generated = 0
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if examples.is_file():
                generated = sum('"stage": "generation"' in line for line in examples.read_text().splitlines())
                if generated >= 2:
                    process.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.02)
    finally:
        if process.poll() is None and generated < 2:
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-generation"
    stages = [json.loads(line)["stage"] for line in examples.read_text().splitlines() if line.endswith("}")]
    assert stages.count("retrieval") == 8 and 2 <= stages.count("generation") < 8
    assert not (out / "report.json").exists()

    rerun = _cli(args, tmp_path, MMRAG_MODELS__LLM__PATH=str(tiny_llm_folder))
    assert rerun.returncode == 0, rerun.stderr
    assert "note: resuming the run in" in rerun.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"]["retrieval"] == 8 and report["resumed"]["generation"] >= 2
    ids = [e["id"] for e in report["generation"]["examples"]]
    assert len(ids) == len(set(ids)) == 8 and [e["id"] for e in report["examples"]] == ids
    recorded = [(item["stage"], item["id"]) for item in map(json.loads, examples.read_text().splitlines())]
    assert len(recorded) == len(set(recorded)) == 16  # every example of both stages recorded exactly once
    assert report["generation"]["rag"]["n"] == 8 and report["generation"]["baseline"]["n"] == 8
    assert all("baseline" in e and "support" in e["baseline"] for e in report["generation"]["examples"])

    # A finished run reruns from its records alone (the gate decides the exit code); another configuration is
    # refused.
    gated = _cli([*args, "--fail-under", "rag.accuracy=1.01"], tmp_path, MMRAG_MODELS__LLM__PATH=str(tiny_llm_folder))
    assert gated.returncode == EXIT_GATE_FAILED, gated.stderr
    assert json.loads(gated.stdout)["resumed"] == {"retrieval": 8, "generation": 8}
    shorter = [("8" if previous == "--max-new-tokens" else arg) for previous, arg in zip(["", *args], args)]
    changed = _cli(shorter, tmp_path, MMRAG_MODELS__LLM__PATH=str(tiny_llm_folder))
    assert changed.returncode == 5 and "holds a run with another configuration (differs in: max_new_tokens" in \
        changed.stderr


# -- the HTML report ----------------------------------------------------------------------------------------------


def _factory(tmp_path, text_embedder, llm=None):
    from eval.cli import merge_overrides
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime

    def factory(**overrides):
        settings = load_settings(**merge_overrides({"data_dir": tmp_path / "data"}, overrides))
        return Runtime(settings, ModelSet(settings, text_embedder=text_embedder, clip=None, llm=llm))

    return factory


def _open_report(path: Path) -> dict:
    from tests.browser import open_page

    with open_page(path.resolve().as_uri()) as (page, errors):
        found = page.evaluate("""() => ({
            tables: Array.from(document.querySelectorAll('table.metrics')).map(t => t.className),
            plots: Array.from(document.querySelectorAll('img.plot')).map(i => i.complete && i.naturalWidth > 0),
            thumbs: Array.from(document.querySelectorAll('.thumbs img')).map(i => i.complete && i.naturalWidth > 0),
            examples: document.querySelectorAll('details.example').length,
            flagged: document.querySelectorAll('ul.flagged li').length,
            external: Array.from(document.querySelectorAll('[src],[href]')).map(e => e.getAttribute('src') ||
                e.getAttribute('href')).filter(u => !u.startsWith('data:')),
            definitions: document.querySelectorAll('table.defs tr').length,
        })""")
        page.locator("details.example summary").first.click()
        found["opened_text"] = page.locator("details.example").first.inner_text()
        found["errors"] = errors.all
    return found


def test_html_report_with_images_in_chromium(shared, tmp_path, text_embedder):
    """Tux Paint caption -> image retrieval: the report's drill-down shows the gold and retrieved images inline."""
    from eval.cli import eval_command

    outcome = eval_command(_factory(tmp_path, text_embedder), "tuxpaint", shared / "tuxpaint", 8, tmp_path / "tux",
                           True, True, progress=False)
    html_path = outcome.path.with_name("report.html")
    found = _open_report(html_path)
    assert found["errors"] == []
    assert found["tables"] == ["metrics retrieval"] and found["examples"] == 8
    assert found["plots"] and all(found["plots"])  # the rank plot
    assert len(found["thumbs"]) >= 8 * 2 and all(found["thumbs"])  # each example: its gold image and the hits
    assert found["external"] == [] and found["definitions"] >= 4
    assert "Prompt:" in found["opened_text"] and "Gold and retrieved images" in found["opened_text"]


@pytest.mark.slow
def test_full_small_run_with_real_models_and_html(shared, tmp_path, text_embedder, llm):
    """``mmrag eval halueval --baseline`` on three questions with the real MiniLM and SmolLM2-135M: every metric of
    the issue is in report.json, consistent with the examples, and report.html opens cleanly in headless Chromium."""
    from eval.cli import eval_command

    qa = shared / "halueval" / "qa_dev.jsonl"
    outcome = eval_command(_factory(tmp_path, text_embedder, llm), "halueval", qa, 3, tmp_path / "run", False, True,
                           baseline=True, max_new_tokens=12, fail_under=["retrieval.hybrid.recall@5=0.9"],
                           fail_over=["rag.hallucination_rate=1"], progress=False)
    report = outcome.report
    assert [g["passed"] for g in outcome.gates] == [True, True] and report["gates"] == outcome.gates
    generation = report["generation"]
    assert generation["config"]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert generation["config"]["support_scorer"] == "lexical"
    for block in ("rag", "baseline"):
        data = generation[block]
        assert {"accuracy", "token_f1", "faithfulness", "hallucination_rate"} <= set(data)
    examples = generation["examples"]
    answered = [e["rag"] for e in examples if not e["rag"]["abstained"]]
    assert answered, "SmolLM2 abstained on every question"
    # The aggregates are those of the per-sentence support flags.
    flags = [[s["supported"] for s in e["support"]] for e in answered]
    assert generation["rag"]["hallucination_rate"] == pytest.approx(metrics.hallucination_rate(flags), abs=1e-4)
    faith = [metrics.faithfulness(f) for f in flags if f]
    assert generation["rag"]["faithfulness"] == (pytest.approx(sum(faith) / len(faith), abs=1e-4) if faith else None)
    for entry in answered:
        assert all(s["supported"] == (s["score"] >= 0.5) for s in entry["support"])
    base_flags = [[s["supported"] for s in e["baseline"]["support"]] for e in examples]
    assert generation["baseline"]["hallucination_rate"] == pytest.approx(metrics.hallucination_rate(base_flags),
                                                                         abs=1e-4)
    found = _open_report(outcome.path.with_name("report.html"))
    assert found["errors"] == [] and found["external"] == []
    assert found["tables"] == ["metrics retrieval", "metrics generation"] and found["examples"] == 3
    # Plots: ranks, RAG vs baseline, faithfulness and support score distributions.
    assert len(found["plots"]) == 4 and all(found["plots"])
    unsupported = sum(1 for e in examples for s in e["rag"].get("support", []) if not s["supported"]) + sum(
        len(e["rag"].get("unsupported", [])) for e in examples) + sum(
        1 for e in examples for s in e["baseline"]["support"] if not s["supported"])
    assert found["flagged"] == unsupported
    assert "RAG answer" in found["opened_text"] and "Baseline answer" in found["opened_text"]


# -- images: CLIPScore and CLIP-I of generated pictures -------------------------------------------------------------


def test_image_stage_on_tuxpaint_with_tiny_models(shared, tmp_path, text_embedder, tiny_clip, tiny_sd):
    """``mmrag eval tuxpaint --images`` with the tiny random CLIP and diffusion pipeline (the scores are arbitrary;
    the test checks that they are the image metrics of the pictures written, and that the report shows them)."""
    from eval.cli import eval_command, merge_overrides
    from generation.image_metrics import clip_i, clip_score
    from mmrag.config import load_settings
    from mmrag.models import ModelSet
    from mmrag.runtime import Runtime
    from tests.tinydiffusion import image_settings

    def factory(**overrides):
        base = {"data_dir": tmp_path / "data", **image_settings(tiny_sd)}
        settings = load_settings(**merge_overrides(base, overrides))
        return Runtime(settings, ModelSet(settings, text_embedder=text_embedder, clip=tiny_clip))

    outcome = eval_command(factory, "tuxpaint", shared / "tuxpaint", 3, tmp_path / "run", False, True, images=True,
                           fail_under=["images.clip_i=-1"], progress=False)
    assert any("text generation is not evaluated" in note for note in outcome.notes)
    report = outcome.report
    assert "generation" not in report and [g["passed"] for g in outcome.gates] == [True]
    pictures = report["images"]
    summary = pictures["summary"]
    assert summary["n"] == 3 and summary["generated"] + summary["failed"] == 3 and summary["generated"] >= 1
    made = [e for e in pictures["examples"] if e["image"]]
    for example in made:
        path = Path(example["image"])
        assert path.is_file() and path.parent == outcome.path.parent / "images"
        assert example["clip_score"] == pytest.approx(clip_score(tiny_clip, [path], [example["prompt"]])[0], abs=1e-3)
        expected = clip_i(tiny_clip, [path], [example["gold"]])[0]
        assert example["clip_i"] == pytest.approx(expected, abs=1e-3)
        assert example["reference_is_gold"] == any(r in example["gold"] for r in example["references"])
    assert summary["clip_score"] == pytest.approx(sum(e["clip_score"] for e in made) / len(made), abs=1e-3)
    assert summary["clip_i"] == pytest.approx(sum(e["clip_i_mean"] for e in made) / len(made), abs=1e-3)
    found = _open_report(outcome.path.with_name("report.html"))
    assert found["errors"] == [] and found["tables"] == ["metrics retrieval", "metrics images"]
    assert "Generated picture" in found["opened_text"] and all(found["thumbs"])
