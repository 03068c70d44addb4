"""The lean decoder (generation/decoder.py): the same logits as transformers in fp32, close ones in int8 and over
4-bit weights held as 4-bit blocks (int4), the same greedy text through the decode loop, derived weights kept for
the next start, and clear errors where it does not apply."""

from __future__ import annotations

import pytest

from mmrag.errors import ConfigError

PROMPT = [{"role": "user", "content": "Name the parts of a steam engine and say what each one does."}]


def _hf_logits(model, ids, steps):
    """transformers' logits for the prompt, then for each chunk of ``steps`` fed after it."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    out = [model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1]]
    for chunk in steps:
        out.append(model(torch.tensor([chunk]), past_key_values=cache, use_cache=True).logits[0, -1])
    return out


def _lean_logits(decoder, ids, steps):
    cache = decoder.new_cache()
    return [decoder.forward(ids, cache)] + [decoder.forward(chunk, cache) for chunk in steps]


@pytest.fixture(scope="module")
def tiny_gqa_llama():
    """A tiny random Llama with grouped-query attention and untied head (the default tiny_llm ties it)."""
    import torch

    from mmrag.compat import ensure_torchvision

    ensure_torchvision()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, rms_norm_eps=1e-6)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("fixture", ["tiny_gqa_llama", "tiny_llm"])
def test_fp32_logits_match_transformers(fixture, request):
    """Prompt, single tokens and a multi-token chunk after the cache (what the citer feeds): transformers' logits."""
    import torch

    from generation.decoder import LeanDecoder

    model = request.getfixturevalue(fixture)
    model = model.model if fixture == "tiny_llm" else model  # tiny_llm is the loaded TextGenerator
    torch.manual_seed(2)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (40,)).tolist()
    steps = [[5], [7, 8, 9], [11]]
    with torch.inference_mode():
        expected = _hf_logits(model, ids, steps)
        got = _lean_logits(LeanDecoder(model, "fp32"), ids, steps)
    for want, have in zip(expected, got, strict=True):
        assert have.dtype == torch.float32 and have.shape == want.shape
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


def test_cache_grows_past_its_first_capacity(tiny_gqa_llama):
    """A long generation outgrows the first allocation: the copied cache keeps every earlier position."""
    import torch

    from generation.decoder import LeanDecoder

    decoder = LeanDecoder(tiny_gqa_llama, "fp32")
    ids = list(range(3, 203))  # 200 tokens: the first capacity is 512; 120 more single steps
    steps = [[i % 290 + 3] for i in range(120)]
    cache = decoder.new_cache()
    decoder.forward(ids[:5], cache)
    first_capacity = cache.values[0].shape[1]
    with torch.inference_mode():
        expected = _hf_logits(tiny_gqa_llama, ids, steps)
        cache = decoder.new_cache()
        cache.reserve(8)  # start small so that the steps below grow it twice
        got = [decoder.forward(ids, cache)] + [decoder.forward(chunk, cache) for chunk in steps]
    assert cache.length == 320 and cache.values[0].shape[1] >= 320 and first_capacity >= 5
    torch.testing.assert_close(got[-1], expected[-1], atol=1e-4, rtol=1e-4)


def test_int8_weights_are_a_quarter_and_close(tiny_gqa_llama):
    import torch

    from generation.decoder import LeanDecoder

    fp32 = LeanDecoder(tiny_gqa_llama, "fp32")
    int8 = LeanDecoder(tiny_gqa_llama, "int8")
    assert int8.weight_bytes < fp32.weight_bytes * 0.27
    torch.manual_seed(3)
    ids = torch.randint(3, 300, (30,)).tolist()
    with torch.inference_mode():
        for want, have in zip(_lean_logits(fp32, ids, [[4], [5, 6]]), _lean_logits(int8, ids, [[4], [5, 6]]),
                              strict=True):
            assert torch.nn.functional.cosine_similarity(want, have, dim=0) > 0.999


def test_generator_uses_the_lean_decoder_with_the_same_greedy_text(tiny_llm_folder):
    """The decode loop over the lean fp32 decoder writes exactly what it writes over transformers' forward pass."""
    from generation.text import SamplingParams, load_text_generator
    from mmrag.config import load_settings
    from mmrag.models import resolve

    def load(**spec):
        settings = load_settings(models={"llm": {"path": str(tiny_llm_folder), **spec}})
        return load_text_generator(resolve("llm", settings.models.llm).require(), settings.models.llm,
                                   settings.runtime)

    lean = load(precision="fp32")
    plain = load(precision="fp32", options={"decoder": "transformers"})
    assert lean.decoder is not None and lean.decoder.form == "fp32" and plain.decoder is None
    assert load().decoder.form == "fp32"  # the CPU default for weights that are not 4-bit (int8 is opt-in)
    assert load(precision="int8").decoder.form == "int8"
    prompt = lean.render(PROMPT)
    params = SamplingParams(max_new_tokens=24, cite_evidence=("Steam pushes a piston.", "A boiler heats water."))
    one, two = lean.complete(prompt, params), plain.complete(prompt, params)
    assert one.completion_tokens == two.completion_tokens == 24 and one.text == two.text


def test_real_model_int8_and_int4_agree_with_fp32(llm):
    """SmolLM2-135M in int8 and int4 against its fp32 weights, teacher-forced over a real answer: the next-token
    choice agrees at nearly every position (the figure benchmarks/generate.py reports on whole answers). Its GGUF
    file is Q4_1, so every matrix is 4-bit blocks, and the default on a CPU with bf16 instructions holds them so."""
    import torch

    from generation.decoder import LeanDecoder
    from mmrag.device import cpu_has_bf16

    assert llm.decoder.form == ("int4" if cpu_has_bf16() else "fp32")

    text = llm.render(PROMPT) + ("A steam engine burns fuel to boil water in a boiler. The steam pushes a piston in "
                                 "a cylinder, and a crank turns the piston's motion into rotation. A valve lets "
                                 "steam in and out, and a condenser turns the spent steam back into water.")
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = len(ids) // 3
    picks = {}
    with torch.inference_mode():
        for form in ("fp32", "int8", "int4"):
            decoder = LeanDecoder(llm.model, form)
            cache = decoder.new_cache()
            decoder.forward(ids[:prefix], cache)
            picks[form] = [int(decoder.forward([t], cache).argmax()) for t in ids[prefix:]]
    for form, least in (("int8", 0.9), ("int4", 0.97)):
        same = sum(a == b for a, b in zip(picks["fp32"], picks[form], strict=True)) / len(picks["fp32"])
        assert same >= least, (form, same)


def _on_four_bit_blocks(model):
    """A copy of ``model`` whose matrices hold what a GGUF Q4_1 file dequantises to: per block of 32 inputs, an
    offset (the block's minimum) plus an fp16 scale times a code 0..15."""
    import copy

    import torch

    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[1] % 32 == 0:
                w = module.weight
                rows, cols = w.shape
                blocks = w.view(rows, cols // 32, 32)
                low = blocks.amin(-1)
                scale = ((blocks.amax(-1) - low) / 15).half().float()
                codes = torch.round((blocks - low[..., None]) / scale[..., None]).clamp(0, 15)
                w.copy_((codes * scale[..., None] + low[..., None]).view(rows, cols))
    return model


def test_int4_blocks_are_recovered_exactly_and_never_made_up():
    import torch

    from generation.decoder import int4_blocks

    torch.manual_seed(5)
    codes = torch.randint(0, 16, (48, 96)).float()
    codes[:, ::32], codes[:, 1::32] = 0, 15  # each block spans its codes, as Q4_1's minimum and maximum do
    scale = (torch.rand(48, 3) * 0.02 + 0.001).half().float()
    offset = -torch.rand(48, 3) * 0.1
    weight = (codes.view(48, 3, 32) * scale[..., None] + offset[..., None]).view(48, 96)
    got = int4_blocks(weight)
    assert got is not None
    torch.testing.assert_close(got[0], codes, rtol=0, atol=0)
    torch.testing.assert_close(got[1], scale, rtol=0, atol=0)
    torch.testing.assert_close(got[2], offset, rtol=0, atol=0)
    assert int4_blocks(torch.randn(48, 96)) is None  # ordinary weights: not quantised behind the user's back
    assert int4_blocks(weight[:, :80]) is None  # rows that are not whole blocks
    nudged = weight.clone()
    nudged[7, 40] += 1e-4
    assert int4_blocks(nudged) is None  # one weight off the grid is enough


def test_int4_holds_four_bit_weights_in_an_eighth_and_stays_close(tiny_gqa_llama):
    import torch

    from generation.decoder import LeanDecoder, NotFourBitError

    model = _on_four_bit_blocks(tiny_gqa_llama)
    fp32 = LeanDecoder(model, "fp32")
    int4 = LeanDecoder(model, "int4")
    layers = sum(p.nbytes for layer in fp32.layers for p in (layer.qkv, layer.out, layer.gate_up, layer.down))
    layers4 = sum(p.nbytes for layer in int4.layers for p in (layer.qkv, layer.out, layer.gate_up, layer.down))
    assert layers4 < layers * 0.16  # 4 bits per weight and a bf16 scale and zero per 32
    torch.manual_seed(3)
    ids = torch.randint(3, 300, (30,)).tolist()
    with torch.inference_mode():  # a prompt (bf16 products), a step and a pair of drafted tokens (the int4 kernel)
        for want, have in zip(_lean_logits(fp32, ids, [[4], [5, 6]]), _lean_logits(int4, ids, [[4], [5, 6]]),
                              strict=True):
            assert torch.nn.functional.cosine_similarity(want, have, dim=-1).min() > 0.9995
            assert torch.equal(want.argmax(-1), have.argmax(-1))
    with pytest.raises(NotFourBitError, match="not 4-bit"):
        LeanDecoder(tiny_gqa_llama, "int4")  # random fp32 weights


def test_derived_weights_are_kept_for_the_next_start(tiny_gqa_llama, tmp_path, caplog):
    import torch

    from generation.decoder import LeanDecoder

    model = _on_four_bit_blocks(tiny_gqa_llama)
    torch.manual_seed(4)
    ids = torch.randint(3, 300, (20,)).tolist()
    for form in ("int4", "int8"):
        store = tmp_path / f"lean-{form}.pt"
        first = LeanDecoder(model, form, store)
        assert store.is_file()
        written = store.stat().st_mtime_ns
        again = LeanDecoder(model, form, store)
        assert store.stat().st_mtime_ns == written  # read, not derived and written again
        with torch.inference_mode():
            for a, b in zip(_lean_logits(first, ids, [[4]]), _lean_logits(again, ids, [[4]]), strict=True):
                assert torch.equal(a, b)
        store.write_bytes(b"not a torch file")  # damaged: derived again, never trusted
        with caplog.at_level("WARNING", logger="generation.decoder"):
            rebuilt = LeanDecoder(model, form, store)
        assert "deriving them again" in caplog.text
        with torch.inference_mode():
            for a, b in zip(_lean_logits(first, ids, [[4]]), _lean_logits(rebuilt, ids, [[4]]), strict=True):
                assert torch.equal(a, b)
        assert LeanDecoder(model, form, store).form == form  # the rewritten file reads back


def test_precision_int4_fails_on_weights_that_are_not_4_bit(tiny_llm_folder):
    from generation.text import load_text_generator
    from mmrag.config import load_settings
    from mmrag.models import resolve

    settings = load_settings(models={"llm": {"path": str(tiny_llm_folder), "precision": "int4"}})
    with pytest.raises(ConfigError, match="never re-quantises"):
        load_text_generator(resolve("llm", settings.models.llm).require(), settings.models.llm, settings.runtime)


def test_wrong_settings_fail_loudly(tiny_llm_folder, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from generation.text import load_text_generator
    from mmrag.config import load_settings
    from mmrag.device import pick_dtype
    from mmrag.models import resolve

    def load(folder, **spec):
        settings = load_settings(models={"llm": {"path": str(folder), **spec}})
        return load_text_generator(resolve("llm", settings.models.llm).require(), settings.models.llm,
                                   settings.runtime)

    with pytest.raises(ConfigError, match="options.decoder"):
        load(tiny_llm_folder, options={"decoder": "fast"})
    for bad in (-1, 17, "4", True):
        with pytest.raises(ConfigError, match="options.draft_tokens"):
            load(tiny_llm_folder, options={"draft_tokens": bad})
    assert load(tiny_llm_folder, options={"draft_tokens": 0}).draft_tokens == 0
    with pytest.raises(ConfigError, match="needs the lean decoder"):
        load(tiny_llm_folder, precision="int8", options={"decoder": "transformers"})
    with pytest.raises(ConfigError, match="models.llm"):
        pick_dtype("int8", "cpu")  # any other role
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a tokenizer, so loading gets as far as the decoder
        if (tiny_llm_folder / name).exists():
            (gpt2 / name).write_bytes((tiny_llm_folder / name).read_bytes())
    with pytest.raises(ConfigError, match="does not cover this model: model type 'gpt2'"):
        load(gpt2, precision="int8")
    assert load(gpt2).decoder is None  # auto: transformers' forward pass, said in the log


def test_rows_of_drafted_tokens_match_one_at_a_time(tiny_gqa_llama):
    """Several tokens fed at once after the cache give, row by row, the logits of feeding them one at a time, and
    setting the cache length back drops positions (how rejected drafted tokens are undone)."""
    import torch

    from generation.decoder import LeanDecoder

    decoder = LeanDecoder(tiny_gqa_llama, "fp32")
    ids = list(range(10, 50))
    with torch.inference_mode():
        cache = decoder.new_cache()
        decoder.forward(ids, cache)
        rows = decoder.forward([60, 61, 62, 63], cache, last=4)
        assert rows.shape == (4, 300) and cache.length == 44
        cache.length = 40  # drop the four
        single = torch.stack([decoder.forward([t], cache) for t in (60, 61, 62, 63)])
        cache.length = 42  # keep two, then go another way
        other = decoder.forward([70], cache)
        fresh = decoder.new_cache()
        decoder.forward(ids + [60, 61], fresh)
        want = decoder.forward([70], fresh)
    assert torch.allclose(rows, single, atol=1e-4)
    assert torch.allclose(other, want, atol=1e-4)


def test_drafter_continues_the_latest_earlier_occurrence():
    from generation.text import _Drafter

    drafter = _Drafter([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], limit=3)
    drafter.extend([2, 3])
    assert drafter.draft(room=10) == [7, 8, 2]  # "2 3" last went on with "7 8", then the answer's own "2"
    drafter.extend([4])
    assert drafter.draft(room=10) == [5, 9, 2]  # the 3-gram "2 3 4" occurs once, in the prompt
    assert drafter.draft(room=1) == [5]
    drafter.extend([42])
    assert drafter.draft(room=10) == []  # "4 42" never occurred


@pytest.mark.slow
def test_drafting_keeps_the_greedy_text_and_saves_forward_passes(llm):
    """With drafted tokens checked in one pass, the real model writes exactly its token-by-token greedy text, the
    decoder's citations included, in fewer forward passes when the answer copies its source."""
    from generation.text import SamplingParams

    source = ("The Ford Mustang was introduced on 17 April 1964 at the New York World's Fair, and more than "
              "a million were built in its first eighteen months.")
    prompt = llm.render([{"role": "system", "content": f"Answer only from the sources and cite them as [n].\n"
                                                       f"[1] {source}"},
                         {"role": "user", "content": "Copy the first source word for word."}])
    params = SamplingParams(max_new_tokens=40, repetition_penalty=1.3, cite_evidence=(source,))
    calls = []
    forward = llm.decoder.forward

    def counted(tokens, cache, last=1):
        calls.append(len(tokens))
        return forward(tokens, cache, last)

    texts, passes = [], []
    saved = llm.draft_tokens
    try:
        llm.decoder.forward = counted
        for draft in (0, 4):
            llm.draft_tokens = draft
            calls.clear()
            texts.append(llm.complete(prompt, params).text)
            passes.append(len(calls))
    finally:
        llm.draft_tokens = saved
        del llm.decoder.forward
    assert texts[0] == texts[1]
    assert "1964" in texts[0] and "[1]" in texts[0]
    assert passes[1] < passes[0] * 0.7, passes
