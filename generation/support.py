"""Support scoring: how well a passage backs a sentence.

``LexicalSupportScorer`` is the offline backend that needs no weights: the share of the sentence's content words
(numbers included, stop words excluded, plural/singular folded) that appear in the passage. It is blind to
negation and paraphrase; a model-based scorer (an NLI cross-encoder) is the stronger choice where one is available.

``CrossEncoderSupportScorer`` is that model-based backend: a sequence-classification model over (evidence, claim)
pairs, loaded with transformers' ``AutoModelForSequenceClassification`` from a local folder or a hub name (the
``[models.support_scorer]`` role: ``path``, or ``name`` such as ``vectara/hallucination_evaluation_model`` or an NLI
DeBERTa such as ``cross-encoder/nli-deberta-v3-small``). What its output means comes from the model's config:
- one logit (hallucination detectors such as HHEM, sentence-transformers cross-encoders): ``sigmoid(logit)``;
- labels named in ``id2label``: the softmax probability of the label that means support ("entailment",
  "consistent", "supported", ...; ``options.support_label`` names it explicitly);
- two unnamed labels: the probability of label 1 (HHEM's convention: 1 = consistent).
A claim is scored against each evidence passage separately and keeps the best score (one passage that entails it
is enough). ``load_support_scorer`` builds the configured backend; ``score_pairs`` scores many claims at once,
batched where the backend can batch. The configured scorer (``ModelSet.support_scorer``) is the one both the grounded
generator's citation check and evaluation use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mmrag.config import ModelSpec, RuntimeSection
    from mmrag.models import Resolution

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_STOP = frozenset("""
a an the and or but if then than so of to in on at by for with from as into onto over under about after before
between through during without within is are was were be been being am do does did has have had having it its it's
this that these those there here which who whom whose what when where why how all any both each few more most other
some such no nor not only own same too very can could will would shall should may might must i you he she we they
me him her us them my your his our their also just one first new being up out off again further once
""".split())


class SupportScorer(Protocol):
    name: str

    def score(self, claim: str, evidence: list[str]) -> float:
        """Support of ``claim`` by the evidence passages, in [0, 1]."""
        ...


def content_words(text: str) -> set[str]:
    words = set()
    for word in _WORD.findall(text.lower()):
        if word in _STOP or (len(word) < 2 and not word.isdigit()):
            continue
        words.add(word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word)
    return words


class LexicalSupportScorer:
    name = "lexical"

    def score(self, claim: str, evidence: list[str]) -> float:
        wanted = content_words(claim)
        if not wanted:
            return 1.0
        have: set[str] = set()
        for passage in evidence:
            have |= content_words(passage)
        return len(wanted & have) / len(wanted)


# -- model-based backend ----------------------------------------------------------------------------------------
SUPPORT_LABELS = ("entailment", "entail", "consistent", "supported", "support", "factual", "true")


def _support_index(config: Any, explicit: str | None) -> int | None:
    """The output index that means "supported", or ``None`` for a single-logit model (sigmoid)."""
    from mmrag.errors import ConfigError

    num_labels = int(getattr(config, "num_labels", 1))
    if num_labels == 1:
        return None
    labels = {int(i): str(name).lower() for i, name in (getattr(config, "id2label", None) or {}).items()}
    if explicit is not None:
        matches = [i for i, name in labels.items() if name == explicit.lower()]
        if not matches:
            raise ConfigError(f"models.support_scorer.options.support_label {explicit!r} is not one of the model's "
                              f"labels {sorted(labels.values())}")
        return matches[0]
    for wanted in SUPPORT_LABELS:
        for i, name in labels.items():
            if name == wanted or name.startswith(wanted):
                return i
    if num_labels == 2:
        return 1
    raise ConfigError(f"cannot tell which of the support scorer's labels {sorted(labels.values())} means "
                      "'supported': set models.support_scorer.options.support_label")


class CrossEncoderSupportScorer:
    """Support as a sequence-classification model's probability that the evidence backs the claim."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, support_label: str | None = None,
                 max_length: int = 512, batch_size: int = 16) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length
        self.batch_size = max(1, batch_size)
        self.support_index = _support_index(model.config, support_label)

    def _probabilities(self, pairs: list[tuple[str, str]]) -> list[float]:
        import torch

        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start:start + self.batch_size]
            encoded = self.tokenizer([p for p, _ in batch], [h for _, h in batch], padding=True,
                                     truncation="longest_first", max_length=self.max_length, return_tensors="pt")
            encoded = {k: v.to(device) for k, v in encoded.items()}
            with torch.inference_mode():
                logits = self.model(**encoded).logits.float()
            if self.support_index is None:
                probs = torch.sigmoid(logits[:, 0])
            else:
                probs = torch.softmax(logits, dim=-1)[:, self.support_index]
            scores.extend(float(p) for p in probs.cpu())
        return scores

    def score_batch(self, items: Sequence[tuple[str, list[str]]]) -> list[float]:
        """Support of each (claim, evidence passages) item: the best probability over its passages; 0.0 for an
        item without evidence."""
        pairs: list[tuple[str, str]] = []
        owners: list[int] = []
        for index, (claim, evidence) in enumerate(items):
            for passage in evidence:
                if passage and passage.strip():
                    pairs.append((passage, claim))
                    owners.append(index)
        best = [0.0] * len(items)
        for owner, probability in zip(owners, self._probabilities(pairs) if pairs else []):
            best[owner] = max(best[owner], probability)
        return best

    def score(self, claim: str, evidence: list[str]) -> float:
        return self.score_batch([(claim, evidence)])[0]


def score_pairs(scorer: SupportScorer, items: Sequence[tuple[str, list[str]]]) -> list[float]:
    """Scores of many (claim, evidence) items: one batched call where the scorer has ``score_batch``."""
    batch = getattr(scorer, "score_batch", None)
    if callable(batch):
        return list(batch(list(items)))
    return [scorer.score(claim, evidence) for claim, evidence in items]


BACKENDS = ("lexical",)


def load_support_scorer(resolution: "Resolution | None", spec: "ModelSpec | None",
                        runtime: "RuntimeSection") -> SupportScorer:
    """The configured support scorer: a built-in ``backend`` (``lexical``), or a cross-encoder from the resolved
    local folder or hub name. No spec means the lexical scorer. A model that cannot load raises
    ``ModelUnavailableError`` naming what to configure."""
    from mmrag.errors import ConfigError, ModelUnavailableError

    if spec is None:
        return LexicalSupportScorer()
    if spec.backend:
        if spec.backend == "lexical":
            return LexicalSupportScorer()
        raise ConfigError(f"models.support_scorer.backend {spec.backend!r} is unknown: the built-in backends are "
                          f"{', '.join(BACKENDS)}; for a model, set models.support_scorer.path or name instead")
    assert resolution is not None
    resolution.require()
    from mmrag.device import configure_threads, pick_device, pick_dtype

    configure_threads(runtime.torch_threads)
    device = pick_device(runtime.device)
    options = dict(spec.options)
    try:
        from mmrag.compat import ensure_torchvision

        ensure_torchvision()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        local = resolution.source != "hub"
        trust = bool(options.get("trust_remote_code", False))
        tokenizer_from = options.get("tokenizer") or resolution.location
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from, local_files_only=local, trust_remote_code=trust)
        model = AutoModelForSequenceClassification.from_pretrained(resolution.location, local_files_only=local,
                                                                   trust_remote_code=trust)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise ModelUnavailableError(f"cannot load the support scorer from {resolution.location}: "
                                    f"{type(exc).__name__}: {exc}. {resolution.note}") from exc
    model.to(device=device, dtype=pick_dtype(spec.precision, device))
    scorer = CrossEncoderSupportScorer(model, tokenizer, name=spec.name or resolution.location,
                                       support_label=options.get("support_label"),
                                       max_length=int(options.get("max_length", 512)), batch_size=spec.batch_size)
    logger.info("support scorer loaded from %s (%s)", resolution.location, device)
    return scorer
