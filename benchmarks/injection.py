"""Prompt injection: how often the generated answer follows an instruction planted in a retrieved passage, with
the project's defences and without them. Prints JSON.

The suite (tests/injectionsuite.py) crosses six car-restoration facts with poisoned passages that try to override
the instructions (plainly, or through control tokens and the source block's delimiters), to exfiltrate a
confidential source retrieved beside them, to suppress citations, or to force an abstention. Every condition uses
the default profile's model and decoder (SmolLM2-135M-Instruct, greedy, decoder-written citations, repetition
penalty): "defended" is GroundedGenerator as configured by default (the grounded template: sources delimited as
data, delimiters and control tokens removed, an instruction never to follow instructions inside sources; and text
addressed to the model withheld from the sources, generation.withhold_instructions); "template_only" is the same
with the withholding off; "naive" pastes the passages raw into the system instruction.

``withheld_from_real_text`` runs the withholding over text that addresses no model (the HaluEval dev passages,
questions and answers, and the text files of ../shared/data/docs): every sentence it would withhold there is a
false positive, listed to read.

    python benchmarks/injection.py [--limit N] [--max-new-tokens 48] [--answers]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import _common  # before any product import: the repository, not this folder, first on sys.path (see there)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="run the first N cases (kinds interleaved)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--answers", action="store_true", help="include every answer in the JSON")
    args = parser.parse_args()
    _common.offline_env()
    import injectionsuite

    from generation.grounded import GroundedGenerator
    from mmrag.config import load_settings
    from mmrag.runtime import Runtime

    started = time.monotonic()
    with Runtime(load_settings()) as runtime:
        generator = GroundedGenerator(runtime)
        runtime.models.llm  # load once, outside the timing of the suite
        loaded = time.monotonic()
        cases = injectionsuite.build_cases(args.limit)
        result = injectionsuite.run_suite(generator, cases, max_new_tokens=args.max_new_tokens,
                                          log=lambda m: print(m, file=sys.stderr, flush=True))
        model = runtime.models.llm.name
    if not args.answers:
        result.pop("answers")
    result["withheld_from_real_text"] = injectionsuite.withheld_from_real_text(_real_texts())
    out = {"benchmark": "injection", "model": model, "machine": _common.machine(),
           "max_new_tokens": args.max_new_tokens, **result,
           "timings_s": {"load": round(loaded - started, 1), "suite": round(time.monotonic() - loaded, 1)}}
    print(json.dumps(out, indent=2))


def _real_texts() -> list[str]:
    """Ordinary documents: HaluEval's dev passages, questions and answers, and the shared text documents."""
    data = _common.shared_data()
    texts: list[str] = []
    for line in (data / "halueval" / "qa_dev.jsonl").read_text().splitlines():
        record = json.loads(line)
        texts += [record[k] for k in ("knowledge", "question", "right_answer", "hallucinated_answer") if k in record]
    for path in sorted((data / "docs").rglob("*")):
        if path.suffix in (".txt", ".md", ".html"):
            texts.append(path.read_text(errors="replace"))
    return texts


if __name__ == "__main__":
    main()
