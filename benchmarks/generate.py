"""Grounded generation against a bare ``model.generate`` on the same prompt, side by side in one run. Prints JSON.

1. Load time: the default LLM (SmolLM2-135M-Instruct, a GGUF file) loaded in a fresh process twice over one empty
   cache dir: the first start converts the GGUF file to safetensors, the second finds the converted weights. Each
   start is split into imports (torch, transformers, torchvision, the product's modules) and the model load
   (``runtime.models.llm``); ``process_s`` adds the interpreter's start-up (the wall time of the child process).
2. A small knowledge base: the first ``--passages`` HaluEval QA records' ``knowledge`` passages (one file each,
   through ``eval.datasets.halueval``), ingested with the real MiniLM text embedder (no CLIP weights exist offline);
   the questions are those records' questions.
3. For each of ``--questions`` questions, interleaved (the order rotating from question to question and round to
   round), ``--rounds`` times:
   - ``pipeline_default``: ``GroundedGenerator(runtime).stream(question, query=Query(k_text=5, k_image=0))``, greedy,
     the profile's decoder features (citation_mode "constrained", repetition_penalty 1.3);
   - ``pipeline_default_fp32``: the default over fp32 weights (``precision = "fp32"``; the default holds the GGUF
     file's 4-bit weights as they are, ``int4``, on CPUs with bf16 instructions; see generation/decoder.py);
   - ``pipeline_nodraft``: the default without drafted tokens (``models.llm.options.draft_tokens`` 0: one forward
     pass per token; see ``generation.text._Drafter``);
   - ``pipeline_plain``: the same with citation_mode "free" and repetition_penalty 1.0: the bare decode loop;
   - ``pipeline_plain_int4`` / ``pipeline_plain_int8`` / ``pipeline_plain_fp32``: the plain loop over the lean
     decoder with the 4-bit weights as blocks (the default here), int8 weights (opt-in, precision "int8") and fp32
     weights (exact: the text ``generate`` writes);
   - ``pipeline_plain_transformers``: the plain loop over transformers' own forward pass (what ``generate`` runs),
     so its ratio to ``bare`` is the decode loop's own overhead;
   - ``bare``: the same rendered prompt (built with ``build_prompt`` from the same grounding, so the same tokens)
     through ``model.generate(input_ids, do_sample=False)`` on ``runtime.models.llm.model`` with its tokenizer:
     a ``max_new_tokens=1`` call for the time to first token, then a call held to exactly ``--max-new-tokens`` tokens
     (``min_new_tokens``).
   To compare equal work, the pipeline is held to ``--max-new-tokens`` too: for the timed runs the generator's
   end-of-turn ids are emptied (``llm.eos_ids``), so the loop goes on past the end of the answer, as
   ``min_new_tokens`` makes ``generate`` do. A first, untimed pass (also the warm-up) lets the answers end
   naturally: ``natural`` reports their lengths and texts, whether the plain loop's greedy text is the text
   ``generate`` writes (it should be over fp32 weights: same prompt, same model, greedy), on how many questions
   the int4 and int8 weights write the same answer as the fp32 ones (plain loop, and the default against
   ``pipeline_default_fp32``), and whether drafting left the default's text unchanged.
   The natural pass's decode rates (``natural.*.tokens_per_s``) are those of answers that end where the model
   ends them; the timed pass runs on past the end, where a small model often repeats itself and drafts pay more.
   Pipeline figures are taken from the call: ``ttft_s`` to the first text piece (retrieval, prompt building,
   tokenising, prefill and the first token), ``total_s`` until the stream is exhausted (the citation check
   included); ``tokens_per_s`` is the decode rate (tokens after the first over the time after the first). Bare
   figures include tokenising the prompt (and decoding the output text for ``total_s``).
Ratios are medians of per-question pairs (the pipeline run against the bare run of the same question and round):
absolute times on the shared 2-core machine drift, ratios much less.
Targets (the issue): pipeline overhead <= 10% of the bare call; the default model decodes at >= 30 tokens/s; a
second start loads in under 5 s.

    python benchmarks/generate.py [--questions 8] [--max-new-tokens 64] [--rounds 2] [--passages 50]

About 7 minutes on the 2-core machine (the first start's GGUF conversion alone takes 30-70 s there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)

MODES = ("pipeline_default", "pipeline_default_fp32", "pipeline_nodraft", "pipeline_plain", "pipeline_plain_int4",
         "pipeline_plain_int8", "pipeline_plain_fp32", "pipeline_plain_transformers", "bare")
# The forward pass each pipeline mode decodes with: the profile's default (the lean decoder over the GGUF file's
# 4-bit weights held as 4-bit blocks where the CPU has bf16 instructions, else fp32), the lean decoder over int4,
# int8 (opt-in: precision "int8") and fp32 weights (exact: greedy text equal to generate's), and transformers' own
# forward pass (the decode loop's overhead against generate on the same forward pass).
DECODERS = {"pipeline_default": "default", "pipeline_default_fp32": "fp32", "pipeline_nodraft": "default",
            "pipeline_plain": "default", "pipeline_plain_int4": "int4", "pipeline_plain_int8": "int8",
            "pipeline_plain_fp32": "fp32", "pipeline_plain_transformers": None}
FULL = ("pipeline_default", "pipeline_default_fp32", "pipeline_nodraft")  # the profile's generation settings
# ``pipeline_nodraft`` is the default without drafted tokens (models.llm.options.draft_tokens 0): every token its
# own forward pass. The other pipeline modes draft as the default does where their decoder is the lean one.
NO_DRAFT = ("pipeline_nodraft",)
_T0 = time.perf_counter()


def note(message: str) -> None:
    """A progress line on stderr (the JSON goes to stdout)."""
    print(f"[generate {time.perf_counter() - _T0:6.0f} s] {message}", file=sys.stderr, flush=True)
PLAIN = {"citation_mode": "free", "repetition_penalty": 1.0}


# -- 1. load time, in a fresh process ---------------------------------------------------------------------------
def load_probe(cache_dir: str, threads: int | None) -> None:
    """Child process: time the imports, then the LLM load from ``cache_dir``; print one JSON line."""
    started = time.perf_counter()
    _common.offline_env()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from generation.grounded import GroundedGenerator  # noqa: F401
    from mmrag.compat import ensure_torchvision
    from mmrag.config import load_settings
    from mmrag.runtime import Runtime
    from retrieval.retriever import Retriever  # noqa: F401

    ensure_torchvision()  # load_text_generator calls it first: transformers' modeling code imports torchvision
    import transformers.modeling_utils  # noqa: F401  (what any model class needs; the Llama module is model load)
    imported = time.perf_counter()
    settings = load_settings(data_dir=Path(cache_dir) / "unused-kb",
                             runtime={"cache_dir": cache_dir, "torch_threads": threads})
    converted_before = any((Path(cache_dir) / "llm").glob("*/config.json"))
    llm = Runtime(settings).models.llm
    loaded = time.perf_counter()
    print(json.dumps({"imports_s": imported - started, "model_load_s": loaded - imported,
                      "start_s": loaded - started, "cache_hit": converted_before, "model": llm.name}))


def timed_start(cache_dir: Path, threads: int | None) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--load-probe", str(cache_dir)]
    if threads is not None:
        command += ["--threads", str(threads)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=_common.ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"load probe failed ({done.returncode}):\n{done.stderr[-3000:]}")
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    return {"start_s": round(probe["start_s"], 2), "imports_s": round(probe["imports_s"], 2),
            "model_load_s": round(probe["model_load_s"], 2), "process_s": round(wall, 2),
            "cache_hit": probe["cache_hit"]}


# -- 3. the three paths ------------------------------------------------------------------------------------------
def run_pipeline(gen: Any, question: str, max_new_tokens: int) -> dict[str, Any]:
    from retrieval.retriever import Query

    started = time.perf_counter()
    stream = gen.stream(question, query=Query(text=question, k_text=5, k_image=0),
                        params=gen.params(max_new_tokens=max_new_tokens))
    first = None
    pieces = []
    for piece in stream:
        if first is None:
            first = time.perf_counter() - started
        pieces.append(piece)
    result = stream.result
    total = time.perf_counter() - started
    usage = result.usage
    return {"ttft_s": first, "total_s": total, "tokens_per_s": usage.get("tokens_per_s"),
            "completion_tokens": usage.get("completion_tokens"), "prompt_tokens": usage.get("prompt_tokens"),
            "retrieve_s": usage.get("retrieve_s"), "loop_first_token_s": usage.get("first_token_s"),
            "finish_reason": result.finish_reason, "sources": len(result.sources), "raw_text": "".join(pieces),
            "no_grounding": result.abstain_reason == "no-grounding",
            "text": result.text, "citations": len(result.citations), "unsupported": len(result.unsupported)}


def run_bare(llm: Any, rendered: str, max_new_tokens: int) -> dict[str, Any]:
    import torch

    tok, model = llm.tokenizer, llm.model
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else next(iter(llm.eos_ids))

    def call(n: int) -> tuple[float, str, int, int]:
        started = time.perf_counter()
        ids = tok(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=pad)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return time.perf_counter() - started, text, int(out.shape[1] - ids.shape[1]), int(ids.shape[1])

    ttft, _, _, prompt_tokens = call(1)
    total, text, new, _ = call(max_new_tokens)
    return {"ttft_s": ttft, "total_s": total, "completion_tokens": new, "prompt_tokens": prompt_tokens,
            "tokens_per_s": (new - 1) / (total - ttft) if total > ttft and new > 1 else None, "raw_text": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8, help="HaluEval questions timed per path and round")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the questions")
    parser.add_argument("--passages", type=int, default=50, help="HaluEval records whose passages form the KB")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-load", action="store_true", help="skip the two fresh-process load timings")
    parser.add_argument("--load-probe", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_probe:
        load_probe(args.load_probe, args.threads)
        return
    _common.offline_env()
    if args.questions > args.passages:
        sys.exit("--questions must not exceed --passages (the questions are those of the ingested passages)")
    work = Path(tempfile.mkdtemp(prefix="mmrag-generate-bench-"))
    cache = work / "cache"
    try:
        out = bench(args, work, cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))


def bench(args: argparse.Namespace, work: Path, cache: Path) -> dict[str, Any]:
    started_all = time.perf_counter()
    # 1. Two fresh starts over one cache dir: converting, then reusing.
    loads: dict[str, Any] = {}
    if not args.skip_load:
        note("first start (converting the GGUF file)")
        loads["first_start"] = timed_start(cache, args.threads)
        note("second start (converted weights kept)")
        loads["second_start"] = timed_start(cache, args.threads)

    from eval.datasets import halueval
    from generation.grounded import GroundedGenerator
    from generation.prompting import build_prompt
    from mmrag.config import load_settings
    from mmrag.device import configure_threads
    from mmrag.runtime import Runtime

    configure_threads(args.threads)
    # 2. The knowledge base.
    records, build = halueval(_common.shared_data() / "halueval" / "qa_dev.jsonl", limit=args.passages)
    corpus = build(work / "corpus")
    overrides = {"data_dir": work / "kb", "runtime": {"cache_dir": str(cache), "torch_threads": args.threads}}
    settings = load_settings(**overrides)
    runtime = Runtime(settings)
    note(f"ingesting {len(corpus.files)} passages")
    start = time.perf_counter()
    report = runtime.ingestor.ingest(list(corpus.files))
    ingest_s = time.perf_counter() - start
    start = time.perf_counter()
    llm = runtime.models.llm
    in_process_load_s = time.perf_counter() - start
    questions = [r.prompt for r in records[: args.questions]]

    gens = {mode: GroundedGenerator(runtime) for mode in MODES if mode != "bare"}
    for mode in gens:
        if mode not in FULL:
            gens[mode].settings = load_settings(**overrides, generation=PLAIN).generation
    from generation.decoder import LeanDecoder

    decoders = {"default": llm.decoder, None: None}
    for form in ("int4", "int8", "fp32"):
        decoders[form] = llm.decoder if llm.decoder.form == form else LeanDecoder(llm.model, form)
    drafts = llm.draft_tokens

    def use(mode: str) -> None:
        llm.decoder = decoders[DECODERS[mode]]
        llm.draft_tokens = 0 if mode in NO_DRAFT or llm.decoder is None else drafts
    default_gen = gens["pipeline_default"].settings
    assert gens["pipeline_plain"].settings.template == default_gen.template  # the same prompt for all three
    n = args.max_new_tokens

    # 3a. Untimed natural pass (and warm-up): answers end where the model ends them; the rendered prompts.
    natural: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES
                                                if mode not in ("pipeline_plain_transformers", "bare")}
    prompts: list[str] = []
    skipped: list[str] = []
    for i, q in enumerate(list(questions)):
        note(f"natural pass {i + 1}/{args.questions}")
        rows = {}
        for mode in natural:
            use(mode)
            rows[mode] = run_pipeline(gens[mode], q, n)
        if any(r["no_grounding"] for r in rows.values()):  # abstained without calling the model: nothing to time
            skipped.append(q)
            questions.remove(q)
            continue
        for mode, row in rows.items():
            natural[mode].append(row)
        grounding = gens["pipeline_default"].retrieve(_query(q))
        prompts.append(build_prompt(gens["pipeline_default"].template, grounding, q, llm,
                                    max_source_chars=default_gen.max_source_chars,
                                    max_prompt_tokens=default_gen.max_prompt_tokens).rendered)
    if not questions:
        sys.exit("every question abstained for want of grounding: nothing to time")
    run_bare(llm, prompts[0], 4)  # warm generate()'s own first-call paths

    # 3b. Timed, interleaved, every path held to n new tokens.
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    eos_ids = llm.eos_ids
    llm.eos_ids = frozenset()  # the loop goes on past the end of the answer, as min_new_tokens makes generate do
    try:
        for round_no in range(args.rounds):
            for i, q in enumerate(questions):
                note(f"round {round_no + 1}/{args.rounds}, question {i + 1}/{len(questions)}")
                shift = (round_no + i) % len(MODES)
                for mode in MODES[shift:] + MODES[:shift]:
                    if mode == "bare":
                        row = run_bare(llm, prompts[i], n)
                    else:
                        use(mode)
                        row = run_pipeline(gens[mode], q, n)
                    row.update(question=i, round=round_no)
                    runs[mode].append(row)
    finally:
        llm.eos_ids = eos_ids
        use("pipeline_default")

    # Greedy equivalence: the plain loop's natural answer is a prefix of what generate writes (generate only
    # differs where min_new_tokens keeps it from ending).
    bare_text = {r["question"]: r["raw_text"] for r in runs["bare"] if r["round"] == 0}
    same = {mode: [bare_text[i].startswith(r["raw_text"]) for i, r in enumerate(natural[mode])]
            for mode in ("pipeline_plain", "pipeline_plain_int4", "pipeline_plain_int8", "pipeline_plain_fp32")}

    def same_text(a: str, b: str) -> str:
        equal = [x["raw_text"] == y["raw_text"] for x, y in zip(natural[a], natural[b], strict=True)]
        return f"{sum(equal)}/{len(equal)}"

    draft_same = [a["raw_text"] == b["raw_text"]
                  for a, b in zip(natural["pipeline_default"], natural["pipeline_nodraft"], strict=True)]
    summary = {mode: _summary(rows) for mode, rows in runs.items()}
    ratios = {mode: _paired(runs[mode], runs["bare"]) for mode in MODES if mode != "bare"}
    decode = summary["pipeline_default"]["tokens_per_s"]
    second = loads.get("second_start", {})
    out = {
        "benchmark": "generate",
        "model": f"{llm.name} (GGUF Q4_1 de-quantised to {str(llm.model.dtype).replace('torch.', '')}), "
                 f"transformers {_version('transformers')}",
        "default_decoder": llm.decoder_name,
        "draft_tokens": drafts,
        "kb": {"passages": report.chunks.get("text", 0), "ingest_s": round(ingest_s, 1),
               "text_embedder": runtime.models.text_embedder.signature.model, "k_text": 5},
        "questions": len(questions),
        "questions_skipped_no_grounding": len(skipped),
        "max_new_tokens": n,
        "rounds": args.rounds,
        "settings": {"pipeline_default": {"citation_mode": default_gen.citation_mode,
                                          "repetition_penalty": default_gen.repetition_penalty},
                     "pipeline_plain": PLAIN, "bare": {"do_sample": False, "min_new_tokens": n}},
        "load": {**loads, "in_benchmark_process_s": round(in_process_load_s, 2)},
        "load_first_s": loads.get("first_start", {}).get("start_s"),
        "load_second_s": second.get("start_s"),
        "medians": summary,
        "pipeline_vs_bare": ratios,
        "natural": {mode: {"completion_tokens": _median([r["completion_tokens"] for r in rows]),
                           "finish_reasons": _count(r["finish_reason"] for r in rows),
                           "ttft_s": _median([r["ttft_s"] for r in rows]),
                           "total_s": _median([r["total_s"] for r in rows]),
                           "tokens_per_s": _median([r["tokens_per_s"] for r in rows if r["tokens_per_s"]]),
                           "citations": sum(r["citations"] for r in rows),
                           "unsupported": sum(r["unsupported"] for r in rows),
                           "example": rows[0]["text"][:300]} for mode, rows in natural.items()},
        "plain_greedy_matches_generate": {mode: f"{sum(v)}/{len(v)}" for mode, v in same.items()},
        "plain_int8_text_equals_fp32": same_text("pipeline_plain_int8", "pipeline_plain_fp32"),
        "plain_int4_text_equals_fp32": same_text("pipeline_plain_int4", "pipeline_plain_fp32"),
        "default_text_equals_default_fp32": same_text("pipeline_default", "pipeline_default_fp32"),
        "default_text_equals_nodraft": f"{sum(draft_same)}/{len(draft_same)}",
        "targets": {
            "pipeline_overhead_max": 0.10,
            "overhead_met": {mode: r["total_overhead"] is not None and r["total_overhead"] <= 0.10
                             for mode, r in ratios.items()},
            "decode_tokens_per_s_min": 30,
            "decode_met": decode is not None and decode >= 30,
            "second_start_max_s": 5,
            "second_start_met": bool(second) and second["start_s"] < 5,
            "second_start_model_load_met": bool(second) and second["model_load_s"] < 5,
        },
        "wall_s": round(time.perf_counter() - started_all, 1),
        "machine": _common.machine(),
    }
    runtime.close()
    return out


def _query(text: str) -> Any:
    from retrieval.retriever import Query

    return Query(text=text, k_text=5, k_image=0)


def _median(values: list[Any], digits: int = 3) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return counts


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["ttft_s", "tokens_per_s", "total_s", "prompt_tokens", "completion_tokens"]
    if "retrieve_s" in rows[0]:
        keys += ["retrieve_s", "loop_first_token_s"]
    return {k: _median([r[k] for r in rows], 2 if k == "tokens_per_s" else 3) for k in keys}


def _paired(rows: list[dict[str, Any]], bare: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of per-(question, round) ratios, pipeline over bare."""
    by_key = {(r["question"], r["round"]): r for r in bare}
    ttft, total, rate = [], [], []
    for r in rows:
        b = by_key[(r["question"], r["round"])]
        ttft.append(r["ttft_s"] / b["ttft_s"])
        total.append(r["total_s"] / b["total_s"])
        if r["tokens_per_s"] and b["tokens_per_s"]:
            rate.append(r["tokens_per_s"] / b["tokens_per_s"])
    total_ratio = _median(total)
    return {"ttft_ratio": _median(ttft), "total_ratio": total_ratio,
            "total_overhead": round(total_ratio - 1, 3) if total_ratio is not None else None,
            "tokens_per_s_ratio": _median(rate)}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
