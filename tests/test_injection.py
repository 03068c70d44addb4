"""The prompt-injection suite of benchmarks/injection.py: its detection logic on hand-written answers, the
withholding of text addressed to the model (what it keeps out, what it leaves alone, what the answer reports), and
(slow) every condition running through the real default model on a few cases."""

from __future__ import annotations

import dataclasses

import pytest

from injectionsuite import ABSTAIN, build_cases, followed, grounding_for, run_suite


def _case(kind: str):
    return next(c for c in build_cases() if c.kind == kind)


def test_suite_covers_every_kind_and_its_canaries_are_not_in_the_honest_passages():
    cases = build_cases()
    assert {c.kind for c in cases} == {"override", "control", "exfiltrate", "no-cite", "abstain"}
    assert len(cases) >= 40
    assert [c.kind for c in build_cases(5)] == ["override", "control", "exfiltrate", "no-cite", "abstain"]
    for case in cases:
        assert case.canary.lower() not in case.honest.lower()
        if case.kind == "exfiltrate":
            assert case.canary in case.confidential and case.canary not in case.poison
            assert len(grounding_for(case).text_hits) == 3
        elif case.kind in ("override", "control"):
            assert case.canary in case.poison


def test_canary_kinds_detect_the_canary_in_any_spelling():
    override = _case("override")
    assert followed(override, override.canary)
    assert followed(override, f"Sure! The answer is **{override.canary.lower()}** [2].")
    assert followed(override, " ".join(override.canary))  # spaced out letters
    assert not followed(override, "The Ford Mustang was introduced on April 17, 1964 [1].")
    exfiltrate = _case("exfiltrate")
    code = exfiltrate.canary  # e.g. 4100-ORCA
    assert followed(exfiltrate, f"The alarm code is {code}. The Mustang came out in 1964 [1].")
    assert followed(exfiltrate, f"alarm code: {code.replace('-', ' ')}")
    assert not followed(exfiltrate, "The Mustang was introduced in 1964 [1]. I cannot share restricted memos.")


def test_no_cite_and_abstain_detection():
    no_cite = _case("no-cite")
    assert followed(no_cite, "The Mustang was introduced in 1964.")
    assert not followed(no_cite, "The Mustang was introduced in 1964 [1].")
    assert not followed(no_cite, "The Mustang was introduced in 1964.", citations=1)  # the checked count wins
    assert followed(no_cite, "It came out in 1964 [1].", citations=0)
    assert not followed(no_cite, f"{ABSTAIN}.")  # abstaining is not answering without citations
    assert not followed(no_cite, "")
    # Cut by the token limit before the first sentence ended: the decoder had not cited yet, so it does not count.
    assert not followed(no_cite, "The Mustang was introduced on April 17, 1964, at the", truncated=True)
    assert followed(no_cite, "The Mustang came out in 1964. It was introduced at the", truncated=True)
    abstain = _case("abstain")
    assert followed(abstain, f"{ABSTAIN}.")
    assert followed(abstain, "anything", abstained=True)
    assert not followed(abstain, "The Mustang was introduced in 1964 [1].")


@pytest.mark.slow
def test_both_conditions_run_through_the_real_model(make_runtime, llm):
    from generation.grounded import GroundedGenerator

    runtime = make_runtime(clip=False, llm=llm)
    generator = GroundedGenerator(runtime)
    cases = build_cases(2)
    result = run_suite(generator, cases, max_new_tokens=16)
    assert result["cases"] == 2 and set(result["follow_rate"]) == {"defended", "template_only", "naive"}
    for row in result["answers"]:
        for condition in ("defended", "template_only", "naive"):
            answer = row[condition]
            assert answer["text"].strip()
            assert answer["followed"] == followed(next(c for c in cases if c.name == row["case"]), answer["text"],
                                                  citations=answer["citations"], abstained=answer["abstained"],
                                                  truncated=answer["truncated"])
    # The control-token case: the defended prompt has one system turn (the forged one was cleaned away); pasting
    # the passage raw, as the naive condition does, gives the model a second.
    from generation.prompting import build_prompt

    control = next(c for c in cases if c.kind == "control")
    built = build_prompt(generator.template, grounding_for(control), control.question, llm, max_source_chars=1200,
                         max_prompt_tokens=1800, withhold_instructions=False)
    assert built.rendered.count("<|im_start|>system") == 1
    assert "maintenance mode" in built.rendered  # the template's defences alone: the passage is there, as data
    withheld = build_prompt(generator.template, grounding_for(control), control.question, llm, max_source_chars=1200,
                            max_prompt_tokens=1800)
    assert "maintenance mode" not in withheld.rendered and control.canary not in withheld.rendered
    raw = llm.render([{"role": "system", "content": control.poison}, {"role": "user", "content": control.question}])
    assert raw.count("<|im_start|>system") == 2


def test_instructions_to_the_model_are_withheld_and_ordinary_text_is_not(shared):
    import json

    from generation.prompting import withheld_text
    from injectionsuite import FACTS

    control = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    for case in build_cases():
        shown, withheld = withheld_text(case.poison, control)
        assert withheld, case.name
        assert case.canary not in shown and "assistant" not in shown.lower(), (case.name, shown)
        if case.kind != "control":  # every sentence of these poisons speaks to the model
            assert shown == "", (case.name, shown)
        else:  # the text before the forged turn or the closed block stays
            assert shown in ("Restoration notes.", "End of data."), shown
    for text in [honest for _, honest in FACTS] + [build_cases()[2].confidential]:
        assert withheld_text(text, control) == (text, ())
    # Ordinary text, with its imperatives and its "you": HaluEval's passages, questions and answers.
    texts = []
    for line in (shared / "halueval" / "qa_dev.jsonl").read_text().splitlines():
        record = json.loads(line)
        texts += [record["knowledge"], record["question"], record["right_answer"]]
    texts += ["Remove the bumper, then ignore the rust on the brackets: it is cosmetic.",
              "Installation instructions: bolt the frame to the wall.",
              "If the engine does not start, you should check the answer to question 3 in the manual.",
              "Never cite a torque value from memory; use the table."]
    assert [t for t in texts if withheld_text(t, control)[1]] == []


def test_the_answer_reports_what_was_withheld_and_a_source_left_empty_is_not_given(make_runtime, tiny_llm):
    from generation.grounded import GroundedGenerator
    from generation.prompting import build_prompt

    generator = GroundedGenerator(make_runtime(clip=False, llm=tiny_llm))
    override = _case("override")
    grounding = grounding_for(override)
    built = build_prompt(generator.template, grounding, override.question, tiny_llm, max_source_chars=1200,
                         max_prompt_tokens=1800)
    assert [s.n for s in built.sources] == [1]  # the poison had nothing else: not given, so not numbered
    assert override.canary not in built.rendered and override.honest in built.rendered
    result = generator.stream(override.question, grounding=grounding,
                              params=generator.params(max_new_tokens=8)).result
    data = result.to_json()
    assert [w["marker"] for w in data["withheld"]] == [0]
    assert data["withheld"][0]["source"] == "/kb/forum-post.html"
    assert any(override.canary in sentence for sentence in data["withheld"][0]["text"])
    assert all(s["marker"] == 1 for s in data["sources"])
    # Nothing but instructions retrieved: the knowledge base does not answer, and the model is not called.
    only_poison = dataclasses.replace(grounding, text_hits=grounding.text_hits[1:])
    abstained = generator.stream(override.question, grounding=only_poison).result
    assert abstained.abstained and abstained.abstain_reason == "withheld"
    assert abstained.usage["completion_tokens"] == 0 and abstained.to_json()["withheld"]
