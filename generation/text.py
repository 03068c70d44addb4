"""Text generation over transformers causal LMs: chat templates, GGUF files, greedy or seeded sampling, stop
sequences, token streaming.

The decode loop is our own (prefill once, then one token per step over the KV cache) rather than
``model.generate`` in a thread: it streams without a helper thread, stops the moment a caller stops reading (an
HTTP client that disconnects), seeds its own ``torch.Generator`` instead of the process-wide RNG, and checks stop
strings on the decoded text. ``benchmarks/generate.py`` measures it against a bare ``model.generate``.

A GGUF file is de-quantised by transformers once (about 20 s for SmolLM2-135M here) and kept as safetensors in the
cache dir; later starts load that in about 1 s.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from generation.citations import states_something  # the decoder cites what the check would flag
from mmrag.errors import BadInputError, ConfigError, ModelUnavailableError

if TYPE_CHECKING:
    from generation.decoder import LeanDecoder
    from mmrag.config import ModelSpec, RuntimeSection
    from mmrag.models import Resolution

logger = logging.getLogger(__name__)

# Drafted tokens checked per forward pass in greedy decoding (``_Drafter``; models.llm.options.draft_tokens).
DRAFT_TOKENS = 4


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 160
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    # > 1: tokens already generated (not the prompt's, so copying from the sources stays free) are penalised, as
    # in CTRL: positive logits divided, negative multiplied.
    repetition_penalty: float = 1.0
    # The sources' texts, numbered from 1: the decoder cites them itself (see ``_Citer``). Empty: off.
    cite_evidence: tuple[str, ...] = ()


@dataclass
class Completion:
    """What one generation produced, filled in as it streams; final once ``finish_reason`` is set."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (end of turn or stop string) | "length" | "cancelled"
    first_token_s: float | None = None  # seconds from the call to the first token
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first."""
        if self.first_token_s is None or self.completion_tokens < 2 or self.total_s <= self.first_token_s:
            return None
        return (self.completion_tokens - 1) / (self.total_s - self.first_token_s)


class TextGenerator:
    """One loaded causal LM and its tokenizer. Generations are serialised (one model, one KV cache at a time)."""

    def __init__(self, model: Any, tokenizer: Any, name: str, *, device: str = "cpu",
                 decoder: "LeanDecoder | None" = None, draft_tokens: int = 0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        # The lean forward pass (generation/decoder.py) when it covers the model; else transformers' own.
        self.decoder = decoder
        # Greedy decoding on the lean decoder checks up to this many drafted tokens per forward pass (see
        # ``_Drafter``); 0 turns drafting off. The text is the same either way.
        self.draft_tokens = draft_tokens if decoder is not None else 0
        self._lock = threading.Lock()
        self._logits_to_keep = True
        config_eos = getattr(model.generation_config, "eos_token_id", None)
        eos: set[int] = set()
        for value in (config_eos, tokenizer.eos_token_id):
            if isinstance(value, int):
                eos.add(value)
            elif value:
                eos.update(int(v) for v in value)
        self.eos_ids = frozenset(eos)

    @property
    def decoder_name(self) -> str:
        """What computes the logits: "lean, int4 weights" (int8, fp32) or "transformers, <dtype>"."""
        if self.decoder is not None:
            return f"lean, {self.decoder.form} weights"
        return f"transformers, {str(getattr(self.model, 'dtype', '')).replace('torch.', '')}"

    @functools.cached_property
    def wordlike(self) -> frozenset[int]:
        """Tokens with a letter in them: the repetition penalty spares digits and punctuation, so numbers and
        dates copied from the sources are not distorted ("1964" is four digit tokens in many vocabularies)."""
        tok = self.tokenizer
        return frozenset(i for piece, i in tok.get_vocab().items()
                         if any(ch.isalpha() for ch in tok.convert_tokens_to_string([piece])))

    @functools.cached_property
    def bracket_tokens(self) -> list[int]:
        """Tokens that open a bracket: masked when the decoder writes the citations itself."""
        tok = self.tokenizer
        return sorted(i for piece, i in tok.get_vocab().items()
                      if tok.convert_tokens_to_string([piece]).strip().startswith("["))

    # -- prompts ----------------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat format; a plain transcript for base models that have none."""
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(lines) + "\n\nAssistant:"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def special_tokens(self) -> list[str]:
        """Strings the tokenizer turns into control tokens (chat turn markers, end of text)."""
        tokens = set(getattr(self.tokenizer, "all_special_tokens", []) or [])
        tokens.update(str(t) for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values()
                      if getattr(t, "special", False))
        return sorted((t for t in tokens if t), key=len, reverse=True)

    # -- generation -------------------------------------------------------------------------------------------
    def stream(self, prompt: str, params: SamplingParams, completion: Completion | None = None) -> Iterator[str]:
        """Yield text pieces as they are decoded; ``completion`` (when given) holds the totals at the end.

        ``prompt`` is the rendered prompt (see ``render``). Closing the iterator early stops generating.
        """
        import torch

        completion = completion if completion is not None else Completion()
        started = time.perf_counter()
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and ids.shape[1] + 1 > limit:
            raise BadInputError(f"the prompt has {ids.shape[1]} tokens; the model {self.name} takes at most {limit}")
        completion.prompt_tokens = int(ids.shape[1])
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device="cpu").manual_seed(params.seed)
        out_ids: list[int] = []
        emitted = ""
        hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string may be arriving
        citer = _Citer(self, params.cite_evidence) if params.cite_evidence else None
        completion.finish_reason = "length"
        with self._lock, torch.inference_mode():
            cache = self.decoder.new_cache() if self.decoder is not None else _new_cache()
            feed = ids[0].tolist()
            drafting = self.draft_tokens > 0 and self.decoder is not None and params.temperature <= 0
            drafter = _Drafter(feed, self.draft_tokens) if drafting else None
            rows: list[Any] = []  # logits computed ahead: rows[i] is the choice before drafted[i] (or after all)
            drafted: list[int] = []  # drafted tokens in the cache, not yet accepted
            try:
                while len(out_ids) < params.max_new_tokens:
                    if not rows:
                        if drafter is not None:
                            drafted = drafter.draft(params.max_new_tokens - len(out_ids) - 1)
                        rows = self._forward_rows(feed + drafted, cache, 1 + len(drafted))
                        feed = []
                    logits = rows.pop(0)
                    expected = drafted.pop(0) if drafted else None
                    if citer is not None:
                        citer.mask(logits)
                    if params.repetition_penalty != 1.0 and out_ids:
                        _penalise(logits, [t for t in out_ids if t in self.wordlike], params.repetition_penalty)
                    token = _pick(logits, params, generator)
                    if completion.first_token_s is None:
                        completion.first_token_s = time.perf_counter() - started
                    end = token in self.eos_ids
                    forced: list[int] = []
                    sentence = citer.due(out_ids, token, end) if citer is not None else None
                    accepted = expected is not None and token == expected and sentence is None and not end
                    if expected is not None and not accepted:  # drop the drafted tokens from here on
                        cache.length -= 1 + len(drafted)
                        rows, drafted = [], []
                    if sentence is not None:
                        forced = citer.cite(sentence, cache)
                    out_ids.extend(forced)
                    if end:
                        completion.finish_reason = "stop"
                        completion.completion_tokens = len(out_ids)
                        break
                    out_ids.append(token)
                    if drafter is not None:
                        drafter.extend(forced + [token])
                    if not accepted:  # an accepted drafted token is in the cache already
                        feed = forced[-1:] + [token]  # the rest of the forced marker is in the cache already
                    completion.completion_tokens = len(out_ids)
                    text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                    if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
                        continue
                    cut = _find_stop(text, params.stop)
                    if cut is not None:
                        completion.finish_reason = "stop"
                        break
                    ready = len(text) - hold
                    if ready > len(emitted):
                        piece, emitted = text[len(emitted):ready], text[:ready]
                        completion.text = emitted
                        yield piece
            except GeneratorExit:
                completion.finish_reason = "cancelled"
                raise
            finally:
                completion.total_s = time.perf_counter() - started
        # Release what was held back for a stop string, up to the stop string when one came.
        text = self.tokenizer.decode(out_ids, skip_special_tokens=True).rstrip("\ufffd")
        cut = _find_stop(text, params.stop)
        text = text[:cut] if cut is not None else text
        if len(text) > len(emitted) and text.startswith(emitted):
            piece, emitted = text[len(emitted):], text
            yield piece
        completion.text = emitted
        completion.total_s = time.perf_counter() - started

    def _forward_rows(self, tokens: list[int], cache: Any, rows: int) -> list[Any]:
        """The logits after each of the last ``rows`` tokens (more than one only on the lean decoder)."""
        if rows == 1:
            return [self._forward(tokens, cache)]
        return list(self.decoder.forward(tokens, cache, last=rows))

    def _forward(self, tokens: list[int], cache: Any) -> Any:
        import torch

        if self.decoder is not None:
            return self.decoder.forward(tokens, cache)
        step = torch.tensor([tokens], device=self.device)
        if self._logits_to_keep:
            try:  # only the last position's logits: the output layer over a whole prompt is wasted work
                return self.model(step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            except TypeError:
                self._logits_to_keep = False
        return self.model(step, past_key_values=cache, use_cache=True).logits[0, -1]

    def complete(self, prompt: str, params: SamplingParams) -> Completion:
        completion = Completion()
        for _ in self.stream(prompt, params, completion):
            pass
        return completion


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ENDS_SENTENCE = re.compile(r"^\s*[)\]\"'\u201d\u2019]*[.!?]")
_CITED = re.compile(r"\[\s*\d")


class _Citer:
    """Citations the decoder writes, for models too small to cite on their own.

    When a sentence of at least three words is about to end (the model picks ".", "!", "?" or the end of its
    turn) without a marker, the loop writes `` [n]`` for the given source that best supports the sentence (the
    highest lexical support, ties to the better-ranked source) and goes on with the token the model had picked. The
    model writes every word; the loop only names the evidence. A sentence that no source supports still gets the
    best one, and the support check afterwards (``generation.citations``) reports it unsupported.

    It picks with the lexical scorer whatever ``models.support_scorer`` configures, on purpose: the marker is fed
    back to the model, so another pick would change the words that follow, and with a lexical pick the answer does
    not depend on which scorer judges it. The pick is also cheap: at a sentence end, lexical scoring of five
    1,200-character sources costs about 0.002 of a decode step, against about one step for a MiniLM-L6-sized
    cross-encoder and 2 to 5 for a DeBERTa-v3-small NLI model. ``GroundedGenerator`` judges the finished answer with
    the configured scorer, so a pick it does not back is flagged.
    """

    def __init__(self, generator: "TextGenerator", evidence: tuple[str, ...]) -> None:
        from generation.support import LexicalSupportScorer

        self.generator = generator
        self.evidence = evidence
        self.scorer = LexicalSupportScorer()
        self.after_period = False
        # The decoder writes every marker: the model may not open a bracket itself (left free, small models
        # run on into "[5] [6] [7] ..." after the first marker).
        self.banned = generator.bracket_tokens

    def mask(self, logits: Any) -> None:
        if self.banned:
            logits[self.banned] = float("-inf")

    def due(self, out_ids: list[int], token: int, end: bool) -> str | None:
        """The sentence to cite before ``token``, or None."""
        tok = self.generator.tokenizer
        text = tok.decode(out_ids, skip_special_tokens=True)
        piece = "" if end else tok.decode([token], skip_special_tokens=True)
        if self.after_period:  # "... 1964." or "... file." then: a full stop only if whitespace or the end follows
            self.after_period = False
            return self._uncited(text) if end or piece[:1].isspace() else None
        if end:
            return self._uncited(text)
        if _ENDS_SENTENCE.match(piece) and not text.rstrip().endswith((".", "!", "?")):
            if piece == piece.rstrip():  # "." alone may be a decimal point or a file name's: decide on the next token
                self.after_period = True
                return None
            return self._uncited(text)  # ".\n", ". ": the sentence ended
        return None

    @staticmethod
    def _uncited(text: str) -> str | None:
        last = _SENTENCE_END.split(text.rstrip())[-1] if text.strip() else ""
        last = re.sub(r"^[.!?]+", "", last)
        if states_something(last) and not _CITED.search(last):
            return last
        return None

    def cite(self, sentence: str, cache: Any) -> list[int]:
        """Write " [n]" into the cache except its last token (the caller feeds it); returns the tokens."""
        scores = [self.scorer.score(sentence, [passage]) for passage in self.evidence]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        tokens = self.generator.tokenizer(f" [{best + 1}]", add_special_tokens=False)["input_ids"]
        if len(tokens) > 1:
            self.generator._forward(tokens[:-1], cache)
        return tokens


class _Drafter:
    """Drafted tokens for greedy decoding, looked up in the text so far (prompt lookup).

    A grounded answer copies names, dates and phrases from its sources. When the last three (or two) tokens also
    occur earlier in the prompt or the answer, the tokens that followed their latest earlier occurrence are a
    likely continuation. The decode loop feeds them with the next token in one forward pass, which reads the
    weights once for all of them, and keeps each drafted token only while it is the token the loop picks itself
    from the logits before it (after the same masking and penalties): the text is the greedy text, and a wrong
    draft costs only its share of that pass.
    """

    NGRAMS = (3, 2)

    def __init__(self, prompt: list[int], limit: int) -> None:
        self.limit = limit
        self.history: list[int] = []
        self.seen: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest continuation starts
        self.extend(prompt)

    def extend(self, tokens: list[int]) -> None:
        history = self.history
        for token in tokens:
            end = len(history)
            for n in self.NGRAMS:
                if end >= n:
                    self.seen[tuple(history[end - n:end])] = end
            history.append(token)

    def draft(self, room: int) -> list[int]:
        """Up to ``limit`` (and ``room``) tokens that followed the latest earlier occurrence of the text's end."""
        history = self.history
        size = min(self.limit, room)
        if size <= 0:
            return []
        for n in self.NGRAMS:
            start = self.seen.get(tuple(history[-n:])) if len(history) >= n else None
            if start is not None:
                return history[start:start + size]
        return []


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _pick(logits: Any, params: SamplingParams, generator: Any) -> int:
    import torch

    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _penalise(logits: Any, seen: list[int], penalty: float) -> None:
    import torch

    if not seen:
        return
    index = torch.tensor(sorted(set(seen)), device=logits.device)
    values = logits[index]
    logits[index] = torch.where(values > 0, values / penalty, values * penalty)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


# -- loading ------------------------------------------------------------------------------------------------
def load_text_generator(resolution: "Resolution", spec: "ModelSpec", runtime: "RuntimeSection") -> TextGenerator:
    """Load the LLM role: a GGUF file (converted once, then cached), a local Hugging Face folder, or a hub name."""
    from mmrag.compat import ensure_torchvision
    from mmrag.device import configure_threads, pick_device, pick_dtype

    configure_threads(runtime.torch_threads)
    ensure_torchvision()  # transformers' auto classes may import torchvision
    device = pick_device(runtime.device)
    # CPU: fp32 weights on the lean decoder (generation/decoder.py) when it covers the model (Llama
    # architectures). Measured on SmolLM2-135M here: bf16 halves the prefill time but does not speed up decoding
    # (torch's bf16 matrix-vector product is no faster than fp32's); int8 weights (precision "int8") decode 1.5x
    # faster than fp32 and answered HaluEval a little worse on every metric, within the noise of 150 questions
    # (accuracy 0.287 against 0.313, faithfulness 0.644 against 0.656), so they are opt-in. GPUs use fp16 through
    # transformers.
    precision = spec.precision
    form = _lean_form(spec, device)
    if precision in ("auto", "int8", "int4") and device == "cpu":
        precision = "fp32"  # the lean decoder's int8 and int4 forms are made from the fp32 weights after loading
    dtype = pick_dtype(precision, device)
    location = Path(resolution.location)
    name = spec.name or location.name
    started = time.perf_counter()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if location.suffix == ".gguf":
            folder = _converted_gguf(location, runtime.cache_path)
        elif resolution.source == "hub":
            folder = None  # download by name (only reachable when the hub is)
        else:
            folder = location
        source = str(folder) if folder is not None else resolution.location
        local = folder is not None
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local)
    except ModelUnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise ModelUnavailableError(
            f"cannot load the LLM from {resolution.location}: {type(exc).__name__}: {exc}. {resolution.note}"
        ) from exc
    model = model.to(device)
    # A converted GGUF folder (in the cache) also keeps the lean decoder's int8/int4 weights for the next start.
    keep = folder if location.suffix == ".gguf" else None
    decoder = _lean_decoder(model, form, spec, keep) if form is not None else None
    generator = TextGenerator(model, tokenizer, name, device=device, decoder=decoder,
                              draft_tokens=_draft_tokens(spec))
    logger.info("LLM %s loaded from %s in %.1f s (%s, %s)", name, source, time.perf_counter() - started,
                device, generator.decoder_name)
    return generator


def _lean_form(spec: "ModelSpec", device: str) -> str | None:
    """The lean decoder's weight form for this role, or None for transformers' forward pass.

    ``models.llm.options.decoder``: "auto" (the default: lean on CPU where it covers the model), "lean" (required:
    fail if it does not cover the model) or "transformers". Precisions "int8" and "int4" need the lean decoder on
    CPU. "auto" on a CPU with bf16 instructions asks for "int4?": int4 where the weights are already 4-bit blocks,
    fp32 where they are not (see ``_lean_decoder``)."""
    choice = str(spec.options.get("decoder", "auto"))
    if choice not in ("auto", "lean", "transformers"):
        raise ConfigError(f"models.llm.options.decoder is {choice!r}; use 'auto', 'lean' or 'transformers'")
    if spec.precision in ("int8", "int4"):
        if device != "cpu":
            raise ConfigError(f"models.llm.precision {spec.precision!r} is a CPU decode form; on {device} use "
                              "'auto' (fp16)")
        if choice == "transformers":
            raise ConfigError(f"models.llm.precision {spec.precision!r} needs the lean decoder; drop "
                              "options.decoder 'transformers' or set precision 'fp32'")
        return spec.precision
    if device != "cpu" or choice == "transformers" or spec.precision not in ("auto", "fp32"):
        if choice == "lean":
            raise ConfigError(f"the lean decoder runs fp32, int8 or int4 weights on CPU, not {spec.precision} "
                              f"on {device}")
        return None
    if spec.precision == "auto":
        from mmrag.device import cpu_has_bf16

        if cpu_has_bf16():  # the int4 kernel multiplies bf16 activations
            return "int4?"
    return "fp32"


def _draft_tokens(spec: "ModelSpec") -> int:
    """``models.llm.options.draft_tokens``: drafted tokens checked per forward pass in greedy decoding (0: off)."""
    value = spec.options.get("draft_tokens", DRAFT_TOKENS)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 16:
        raise ConfigError(f"models.llm.options.draft_tokens is {value!r}; use a whole number from 0 (off) to 16")
    return value


def _lean_decoder(model: Any, form: str, spec: "ModelSpec", keep: Path | None = None) -> "LeanDecoder | None":
    """The lean decoder in ``form`` ("int4?": int4 where the weights are 4-bit blocks, else fp32), or None where it
    does not cover the model; ``keep``: a folder for its derived weights (see ``LeanDecoder``'s ``store``)."""
    from generation.decoder import LeanDecoder, NotFourBitError, unsupported_reason

    reason = unsupported_reason(model)
    if reason is None:
        def store(kind: str) -> Path | None:
            return keep / f"lean-{kind}.pt" if keep is not None else None

        if form != "int4?":
            try:
                return LeanDecoder(model, form, store(form))  # type: ignore[arg-type]
            except NotFourBitError as exc:
                raise ConfigError(f"models.llm.precision 'int4' holds weights that are already 4-bit (a GGUF Q4_1 "
                                  f"file) in that form and never re-quantises; this model's are not ({exc}): "
                                  "set precision 'int8' or 'fp32'") from exc
        try:
            return LeanDecoder(model, "int4", store("int4"))
        except NotFourBitError as exc:
            logger.info("LLM weights in fp32: they are not 4-bit blocks (%s)", exc)
            return LeanDecoder(model, "fp32")
    explicit = spec.precision in ("int8", "int4") or spec.options.get("decoder") == "lean"
    if explicit:
        raise ConfigError(f"the lean decoder (needed for precision {spec.precision!r} or options.decoder 'lean') "
                          f"does not cover this model: {reason}; set models.llm.precision 'fp32' and "
                          "options.decoder 'auto'")
    logger.info("LLM on transformers' forward pass: the lean decoder does not cover it (%s)", reason)
    return None


def _converted_gguf(gguf: Path, cache_root: Path) -> Path:
    """A safetensors folder converted from a GGUF file, made on first use and reused while the file is unchanged."""
    import transformers

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
                         .encode()).hexdigest()[:16]
    folder = cache_root / "llm" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    logger.info("converting %s to safetensors in %s (once)", gguf.name, folder)
    model, tokenizer = _load_gguf(gguf)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(f"{folder}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        _save_plain(model, tokenizer, staging)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)  # a killed conversion never leaves a half-written folder behind
    except OSError as exc:
        raise ModelUnavailableError(
            f"cannot write the converted LLM to {folder}: {exc}; set runtime.cache_dir (MMRAG_RUNTIME__CACHE_DIR) "
            "to a writable folder") from exc
    return folder


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise ModelUnavailableError(f"reading {gguf.name} needs the gguf package: pip install gguf ({exc})") from exc
    return model, tokenizer


def _save_plain(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save a de-quantised GGUF model as a plain one: transformers refuses to save a model it marked as GGUF."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
