"""``report.html``: one self-contained page for an eval run (inline CSS, plots as inline PNG, no script, no
external request), written next to ``report.json``.

Sections: the run's configuration; metric tables (retrieval per mode, generation for RAG and the baseline, the
unanswerable questions, the support scorer as a detector); plots (matplotlib, Agg backend): the rank of the first
gold hit per mode, RAG vs baseline, per-answer faithfulness and sentence support scores, detector score
distributions; every metric's definition; and a per-example drill-down (prompt, gold, retrieved sources, answers with
their flagged sentences, images as inline thumbnails).
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["render_html", "write_html"]

THUMBNAIL_PX = 96
MAX_THUMBNAILS = 400  # per report: a 1,000-image run stays a few MB
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

RETRIEVAL_DEFINITIONS = {
    "recall@k": "share of a prompt's gold sources (passages: their files; images: the image files) among the first k "
                "distinct sources retrieved, averaged over prompts",
    "MRR": "mean of 1 / rank of the first gold source (0 when none is in the top 10)",
    "nDCG@k": "DCG over the first k with gain 1 per gold source and discount 1/log2(rank + 1), divided by the DCG of "
              "an ideal ranking",
    "p50 / p95 ms": "latency of one retrieve call (query embedding included), median and 95th percentile",
}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;
color:#1d2330;background:#fff}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8dce6;padding:3px 8px;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}th{background:#f2f4f8}
table.defs td{text-align:left;max-width:900px}
.meta{color:#5a6275}.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{margin:0}
.plots img{max-width:560px;border:1px solid #e3e6ee}
details{border:1px solid #e3e6ee;border-radius:4px;margin:4px 0;padding:4px 8px}
summary{cursor:pointer}summary .tag{font-size:12px;border-radius:3px;padding:0 5px;margin-left:6px}
.ok{background:#e3f4e6;color:#17612b}.bad{background:#fbe4e4;color:#8a1f1f}.neutral{background:#eef0f5;color:#444}
.answer{white-space:pre-wrap;background:#f7f8fb;padding:6px;border-radius:3px;margin:2px 0 6px}
mark.flag{background:#ffd9d9}ul{margin:2px 0 6px 18px;padding:0}li.gold{font-weight:600}
.thumbs{display:flex;gap:6px;flex-wrap:wrap}.thumbs figure{margin:0;font-size:11px;text-align:center;max-width:110px}
.thumbs img{border:2px solid #ccd;border-radius:3px}.thumbs img.gold{border-color:#2d9b4a}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]], css: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# -- plots --------------------------------------------------------------------------------------------------------
def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.2), dpi=100)
    return fig, ax


def _png(fig: Any, alt: str, caption: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<figure><img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption class=meta>{_e(caption)}</figcaption></figure>")


def _rank_plot(report: dict[str, Any]) -> str | None:
    examples = report.get("examples") or []
    modes = list(report.get("modes") or {})
    if not examples or not modes:
        return None
    fig, ax = _figure()
    labels = [str(r) for r in range(1, 11)] + ["miss"]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        counts = [0] * 11
        for example in examples:
            for target in ("text", "image"):
                entry = (example.get("modes", {}).get(mode) or {}).get(target)
                if entry is not None:
                    rank = entry.get("rank")
                    counts[(rank - 1) if rank and rank <= 10 else 10] += 1
        ax.bar([x + i * width for x in range(11)], counts, width=width, label=mode)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(11)], labels)
    ax.set_xlabel("rank of the first gold source")
    ax.set_ylabel("prompts")
    ax.legend(fontsize=8)
    return _png(fig, "rank of the first gold source per retrieval mode", "Where the first gold source ranks, per mode")


def _rag_vs_baseline_plot(generation: dict[str, Any]) -> str | None:
    rag, base = generation.get("rag"), generation.get("baseline")
    if not rag:
        return None
    names = ["accuracy", "token_f1", "faithfulness", "hallucination_rate"]
    fig, ax = _figure()
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [rag.get(n) or 0.0 for n in names], width=0.4, label="RAG")
    if base:
        ax.bar([x + 0.2 for x in xs], [base.get(n) or 0.0 for n in names], width=0.4, label="baseline (no retrieval)")
    ax.set_xticks(list(xs), [n.replace("_", " ") for n in names])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _png(fig, "RAG vs baseline", "RAG vs the same model without retrieval")


def _distribution_plot(series: dict[str, list[float]], xlabel: str, alt: str, caption: str) -> str | None:
    series = {name: values for name, values in series.items() if values}
    if not series:
        return None
    fig, ax = _figure()
    bins = [i / 20 for i in range(21)]
    for name, values in series.items():
        ax.hist([min(max(v, 0.0), 1.0) for v in values], bins=bins, alpha=0.55, label=f"{name} (n={len(values)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    return _png(fig, alt, caption)


def _plots(report: dict[str, Any]) -> list[str]:
    plots = [_rank_plot(report)]
    generation = report.get("generation") or {}
    if generation:
        plots.append(_rag_vs_baseline_plot(generation))
        examples = generation.get("examples") or []
        faith = {"RAG": [e["rag"]["faithfulness"] for e in examples
                         if e["rag"].get("faithfulness") is not None],
                 "baseline": [e["baseline"]["faithfulness"] for e in examples
                              if "baseline" in e and e["baseline"].get("faithfulness") is not None]}
        plots.append(_distribution_plot(faith, "faithfulness of one answer", "faithfulness distribution",
                                        "Per-answer faithfulness (share of supported sentences)"))
        support = {"RAG": [s["score"] for e in examples for s in e["rag"].get("support", [])],
                   "baseline": [s["score"] for e in examples for s in (e.get("baseline") or {}).get("support", [])]}
        plots.append(_distribution_plot(support, "support score of one sentence", "support score distribution",
                                        "Support scores of answer sentences"))
    detector = report.get("detector") or {}
    for form in (detector.get("forms") or {}):
        examples = detector.get("examples") or []
        plots.append(_distribution_plot(
            {"right answers": [e[form]["right"] for e in examples],
             "hallucinated answers": [e[form]["hallucinated"] for e in examples]},
            "support score", f"detector scores ({form})", f"Detector scores, {form} pairs"))
    return [p for p in plots if p]


# -- tables -------------------------------------------------------------------------------------------------------
def _retrieval_section(report: dict[str, Any]) -> str:
    modes = report.get("modes") or {}
    if not modes:
        return ""
    k = (report.get("config") or {}).get("k", 5)
    metrics = ["recall@1", f"recall@{k}", "recall@10", "mrr", f"ndcg@{k}", "ndcg@10"]
    rows = [[_e(mode), _num(d.get("n")), *(_num(d.get(m)) for m in metrics),
             _num(d["latency_ms"]["p50"], 1), _num(d["latency_ms"]["p95"], 1)] for mode, d in modes.items()]
    rows += [[_e(mode), "–", *(["skipped"] + [""] * (len(metrics) + 1))] for mode in report.get("skipped") or {}]
    header = ["mode", "n", *(m.replace("mrr", "MRR").replace("ndcg", "nDCG") for m in metrics), "p50 ms", "p95 ms"]
    return "<h2>Retrieval</h2>" + _table(header, rows, "metrics retrieval")


def _generation_section(generation: dict[str, Any]) -> str:
    if not generation:
        return ""
    names = ["n", "accuracy", "token_f1", "faithfulness", "hallucination_rate", "citation_precision",
             "citation_recall", "unsupported_sentence_rate", "abstention_rate"]
    rows = []
    for label, key in (("RAG", "rag"), ("baseline (no retrieval)", "baseline")):
        data = generation.get(key)
        if data:
            rows.append([label, *(_num(data.get(n)) for n in names)])
    held = generation.get("unanswerable")
    if held:
        rows.append(["unanswerable (not in the knowledge base)", _num(held.get("n")), *(["–"] * 7),
                     _num(held.get("abstention_rate"))])
    config = generation.get("config") or {}
    meta = (f"<p class=meta>model {_e(config.get('model'))}, at most "
            f"{_e((config.get('sampling') or {}).get('max_new_tokens'))} new tokens, support scorer "
            f"{_e(config.get('support_scorer'))} (threshold {_e(config.get('min_support'))})</p>")
    return ("<h2>Generation</h2>" + meta + _table(["answers", *(n.replace("_", " ") for n in names)], rows,
                                                 "metrics generation"))


def _detector_section(detector: dict[str, Any]) -> str:
    if not detector:
        return ""
    names = ["n", "auroc", "f1", "precision", "recall", "best_f1", "best_threshold", "mean_right",
             "mean_hallucinated"]
    rows = [[_e(form), *(_num(d.get(n)) for n in names)] for form, d in detector.get("forms", {}).items()]
    config = detector.get("config") or {}
    meta = (f"<p class=meta>scorer {_e(config.get('scorer'))}, threshold {_e(config.get('threshold'))}: a pair's "
            "answer is flagged as hallucinated when its support score is below it</p>")
    return "<h2>Support scorer as a hallucination detector</h2>" + meta + _table(["pairs", *names], rows,
                                                                                  "metrics detector")


def _images_section(images: dict[str, Any]) -> str:
    if not images:
        return ""
    summary, config = images.get("summary") or {}, images.get("config") or {}
    names = ["n", "generated", "failed", "clip_score", "clip_i", "gold_reference_rate"]
    modes = ", ".join(f"{_e(mode)} {n}" for mode, n in (summary.get("modes") or {}).items()) or "–"
    row = [*(_num(summary.get(n)) for n in names), modes]
    meta = f"<p class=meta>image model {_e(config.get('model'))}, CLIP {_e(config.get('clip'))}</p>"
    return "<h2>Images</h2>" + meta + _table([*(n.replace("_", " ") for n in names), "modes"], [row],
                                              "metrics images")


def _definitions(report: dict[str, Any]) -> str:
    rows = [[_e(k), _e(v)] for k, v in RETRIEVAL_DEFINITIONS.items()] if report.get("modes") else []
    for block in ("generation", "images", "detector"):
        rows += [[_e(k), _e(v)] for k, v in ((report.get(block) or {}).get("definitions") or {}).items()]
    if not rows:
        return ""
    return "<h2>Definitions</h2>" + _table(["metric", "definition"], rows, "defs")


# -- drill-down ---------------------------------------------------------------------------------------------------
class _Thumbs:
    """Inline JPEG thumbnails, each file encoded once, at most ``MAX_THUMBNAILS`` per report."""

    def __init__(self) -> None:
        self.cache: dict[str, str | None] = {}

    def get(self, path: str) -> str | None:
        if path in self.cache:
            return self.cache[path]
        if len(self.cache) >= MAX_THUMBNAILS or Path(path).suffix.lower() not in IMAGE_SUFFIXES:
            return None
        uri = None
        try:
            from PIL import Image

            with Image.open(path) as image:
                image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                canvas = Image.new("RGB", image.size, "white")
                rgba = image.convert("RGBA")
                canvas.paste(rgba, mask=rgba.split()[-1])
                buffer = io.BytesIO()
                canvas.save(buffer, format="JPEG", quality=80)
            uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        except Exception as exc:  # noqa: BLE001 - a missing or broken image only loses its thumbnail
            logger.info("no thumbnail for %s: %s", path, exc)
        self.cache[path] = uri
        return uri


def _answer(text: str, flagged: list[str]) -> str:
    escaped = _e(text)
    for sentence in sorted(set(flagged), key=len, reverse=True):
        needle = _e(sentence)
        if needle and needle in escaped:
            escaped = escaped.replace(needle, f'<mark class="flag">{needle}</mark>')
    return f'<div class="answer">{escaped}</div>'


def _flag_list(support: list[dict[str, Any]], unsupported: list[str]) -> str:
    items = [f"<li>{_e(s['sentence'])} <span class=meta>(support {s['score']:.2f})</span></li>"
             for s in support if not s["supported"]]
    items += [f"<li>{_e(s)} <span class=meta>(no valid citation or cited source does not back it)</span></li>"
              for s in unsupported]
    return f"<p>Flagged sentences:</p><ul class=flagged>{''.join(items)}</ul>" if items else ""


def _picture(entry: dict[str, Any], thumbs: _Thumbs) -> str:
    if not entry.get("image"):
        return f"<p><b>Generated picture:</b> none ({_e(entry.get('error') or 'no picture')})</p>"
    uri = thumbs.get(entry["image"])
    img = (f'<img class="generated" alt="generated picture" src="{uri}">' if uri else _e(Path(entry["image"]).name))
    refs = ", ".join(_e(Path(r).name) for r in entry.get("references") or []) or "none"
    return (f"<p><b>Generated picture</b> <span class=meta>(mode {_e(entry.get('mode'))}; CLIPScore "
            f"{_num(entry.get('clip_score'), 1)}; CLIP-I {_num(entry.get('clip_i_mean'), 3)}; references "
            f"{refs})</span></p><div class=thumbs><figure>{img}</figure></div>")


def _example(report: dict[str, Any], example: dict[str, Any], generated: dict[str, Any] | None,
             thumbs: _Thumbs, picture: dict[str, Any] | None = None) -> str:
    parts = [f"<p><b>Prompt:</b> {_e(example.get('prompt'))}</p>"]
    tags = []
    if generated is not None:
        if generated.get("gold_answer"):
            parts.append(f"<p><b>Gold answer:</b> {_e(generated['gold_answer'])}</p>")
    gold = example.get("gold") or {}
    modes = example.get("modes") or {}
    mode = "hybrid" if "hybrid" in modes else next(iter(modes), None)
    if mode is not None:
        entry = modes[mode]
        for kind in ("text", "image"):
            if kind not in entry:
                continue
            wanted = set(gold.get(kind, []))
            rank = entry[kind].get("rank")
            tags.append(f'<span class="tag {"ok" if rank == 1 else "bad" if rank is None else "neutral"}">'
                        f"{kind} rank {rank if rank else 'miss'}</span>")
            hits = entry[kind]["retrieved"][:5]
            if kind == "text":
                items = "".join(f'<li class="{"gold" if h["source"] in wanted else ""}">{_e(Path(h["source"]).name)}'
                                f' <span class=meta>score {h["score"]:.3f}{" · gold" if h["source"] in wanted else ""}'
                                "</span></li>" for h in hits)
                parts.append(f"<p><b>Retrieved passages ({_e(mode)}):</b></p><ul>{items}</ul>")
            else:
                figures = []
                for path in sorted(wanted):
                    uri = thumbs.get(path)
                    img = (f'<img class="gold" alt="gold {_e(Path(path).name)}" src="{uri}">' if uri
                           else _e(Path(path).name))
                    figures.append(f"<figure>{img}<figcaption>gold</figcaption></figure>")
                for i, h in enumerate(hits, 1):
                    uri = thumbs.get(h["source"])
                    css = "gold" if h["source"] in wanted else ""
                    img = (f'<img class="{css}" alt="{_e(Path(h["source"]).name)}" src="{uri}">' if uri
                           else _e(Path(h["source"]).name))
                    figures.append(f"<figure>{img}<figcaption>#{i} {h['score']:.3f}</figcaption></figure>")
                parts.append(f"<p><b>Gold and retrieved images ({_e(mode)}):</b></p><div class=thumbs>"
                             f"{''.join(figures)}</div>")
    if picture is not None:
        parts.append(_picture(picture, thumbs))
    if generated is not None:
        rag = generated["rag"]
        sources = "".join(f'<li class="{"gold" if s.get("gold") else ""}">[{s["marker"]}] '
                          f'{_e(Path(s["source"]).name)}</li>' for s in rag.get("sources", []))
        if sources:
            parts.append(f"<p><b>Sources given to the model:</b></p><ul>{sources}</ul>")
        flagged = [s["sentence"] for s in rag.get("support", []) if not s["supported"]]
        label = "abstained" if rag.get("abstained") else f"faithfulness {_num(rag.get('faithfulness'), 2)}"
        parts.append(f"<p><b>RAG answer</b> <span class=meta>({_e(label)}; correct "
                     f"{_num(rag.get('correct'), 0)})</span></p>" + _answer(rag.get("text", ""), flagged))
        parts.append(_flag_list(rag.get("support", []), list(rag.get("unsupported", []))))
        if rag.get("abstained"):
            tags.append('<span class="tag neutral">abstained</span>')
        elif any(not s["supported"] for s in rag.get("support", [])):
            tags.append('<span class="tag bad">RAG: unsupported sentence</span>')
        else:
            tags.append('<span class="tag ok">RAG: supported</span>')
        tags.append(f'<span class="tag {"ok" if rag.get("correct") else "bad"}">RAG '
                    f'{"correct" if rag.get("correct") else "wrong"}</span>')
        base = generated.get("baseline")
        if base:
            flagged = [s["sentence"] for s in base.get("support", []) if not s["supported"]]
            parts.append(f"<p><b>Baseline answer (no retrieval)</b> <span class=meta>(faithfulness "
                         f"{_num(base.get('faithfulness'), 2)}; correct {_num(base.get('correct'), 0)})</span></p>"
                         + _answer(base.get("text", ""), flagged) + _flag_list(base.get("support", []), []))
    title = _e(example.get("id"))
    return (f'<details class="example"><summary>{title}{"".join(tags)}</summary>{"".join(parts)}</details>')


def _drilldown(report: dict[str, Any]) -> str:
    retrieval = {e["id"]: e for e in report.get("examples") or []}
    generation = {e["id"]: e for e in (report.get("generation") or {}).get("examples") or []}
    pictures = {e["id"]: e for e in (report.get("images") or {}).get("examples") or []}
    ids = list(dict.fromkeys([*retrieval, *generation, *pictures]))
    if not ids:
        return ""
    thumbs = _Thumbs()
    items = []
    for example_id in ids:
        prompt = (generation.get(example_id) or pictures.get(example_id) or {}).get("prompt")
        base = retrieval.get(example_id) or {"id": example_id, "prompt": prompt}
        items.append(_example(report, base, generation.get(example_id), thumbs, pictures.get(example_id)))
    return f"<h2>Examples ({len(ids)})</h2><div id=examples>{''.join(items)}</div>"


def _detector_drilldown(detector: dict[str, Any], limit: int = 200) -> str:
    examples = detector.get("examples") or []
    if not examples:
        return ""
    forms = list(detector.get("forms") or {})
    rows = [[_e(e["id"]), f'<span style="text-align:left">{_e(e["question"])}</span>', _e(e["right"]),
             _e(e["hallucinated"]), *(f"{e[f]['right']:.2f} / {e[f]['hallucinated']:.2f}" for f in forms)]
            for e in examples[:limit]]
    note = f" (first {limit} of {len(examples)})" if len(examples) > limit else ""
    return (f"<h2>Detector pairs{note}</h2>" + _table(["id", "question", "right answer", "hallucinated answer",
                                                       *(f"{f}: right / halluc." for f in forms)], rows, "pairs"))


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page."""
    dataset = report.get("dataset") or {}
    config = report.get("config") or {}
    title = f"mmrag eval: {dataset.get('name', 'run')}"
    meta_rows = [["dataset", _e(dataset.get("given"))], ["records", _num(dataset.get("records"))],
                 ["created", _e(report.get("created"))], ["seconds", _num(report.get("seconds"), 1)],
                 ["profile", _e(config.get("profile"))], ["knowledge base", _e(config.get("knowledge_base"))]]
    if report.get("resumed"):
        meta_rows.append(["resumed examples", _e(report["resumed"])])
    gates = report.get("gates") or []
    gate_html = ""
    if gates:
        gate_rows = [[_e(g["rule"]), _num(g["value"], 4),
                      f'<span class="tag {"ok" if g["passed"] else "bad"}">{"passed" if g["passed"] else "FAILED"}'
                      "</span>"] for g in gates]
        gate_html = "<h2>Gates</h2>" + _table(["threshold", "value", "result"], gate_rows, "gates")
    plots = _plots(report)
    body = [
        f"<h1>{_e(title)}</h1>",
        _table(["", ""], meta_rows, "meta-table"),
        gate_html,
        _retrieval_section(report),
        _generation_section(report.get("generation") or {}),
        _images_section(report.get("images") or {}),
        _detector_section(report.get("detector") or {}),
        ("<h2>Plots</h2><div class=plots>" + "".join(plots) + "</div>") if plots else "",
        _definitions(report),
        _drilldown(report),
        _detector_drilldown(report.get("detector") or {}),
    ]
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content=\"width=device-width, initial-scale=1\">"
            "<link rel=icon href=\"data:,\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_html(report: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.write_text(render_html(report), encoding="utf-8")
    return path
