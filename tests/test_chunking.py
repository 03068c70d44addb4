"""Chunking: title-aware, bounded by the embedder's tokens, overlapping, tables whole where they fit."""

from __future__ import annotations

import pytest

from ingest.chunking import chunk_elements
from ingest.elements import Element


def _sentence(i: int) -> str:
    return f"Sentence number {i} talks about the history of the Debian project and its releases."


def test_every_chunk_fits_the_token_budget_and_overlaps(text_embedder):
    paragraphs = [Element("text", " ".join(_sentence(i * 10 + j) for j in range(10)), page=1 + i // 3)
                  for i in range(12)]
    drafts = chunk_elements(paragraphs, text_embedder, max_tokens=128, overlap=16)
    counts = text_embedder.count_tokens([d.text for d in drafts])
    assert len(drafts) > 5
    assert max(counts) <= 128 + 16  # budget plus the carried overlap at most
    # Consecutive chunks share text: the tail of one begins the next.
    for before, after in zip(drafts, drafts[1:]):
        assert after.text.split()[0] in before.text
    # Nothing is lost: every sentence is in some chunk.
    joined = " ".join(d.text for d in drafts)
    assert all(_sentence(i) in joined for i in range(120))


def test_titles_start_chunks_and_stay_with_their_text(text_embedder):
    elements = [Element("title", "Releases"), Element("text", "Debian 1.1 was called buzz.", page=2),
                Element("title", "Leaders"), Element("text", "Ian Murdock founded Debian in 1993.", page=3)]
    drafts = chunk_elements(elements, text_embedder, max_tokens=128, overlap=16)
    assert [d.text for d in drafts] == ["Releases\n\nDebian 1.1 was called buzz.",
                                        "Leaders\n\nIan Murdock founded Debian in 1993."]
    assert [d.page for d in drafts] == [2, 3]
    assert drafts[1].meta["title"] == "Leaders"


def test_titles_without_text_are_kept_as_text(text_embedder):
    elements = [Element("title", "Deutsch"), Element("title", "Français"), Element("title", "English")]
    drafts = chunk_elements(elements, text_embedder, max_tokens=128, overlap=16)
    assert [d.text for d in drafts] == ["Deutsch\n\nFrançais\n\nEnglish"]
    elements = [Element("title", "A"), Element("text", "body a"), Element("title", "Empty"), Element("title", "B"),
                Element("text", "body b"), Element("title", "Last")]
    texts = [d.text for d in chunk_elements(elements, text_embedder, max_tokens=128, overlap=16)]
    assert texts == ["A\n\nbody a\n\nEmpty", "B\n\nbody b\n\nLast"]


def test_paragraph_longer_than_budget_is_windowed(text_embedder):
    long = " ".join(_sentence(i) for i in range(60))
    drafts = chunk_elements([Element("text", long)], text_embedder, max_tokens=64, overlap=8)
    counts = text_embedder.count_tokens([d.text for d in drafts])
    assert len(drafts) >= 10 and max(counts) <= 64


def test_tables_stay_whole_when_they_fit_and_split_by_rows_otherwise(text_embedder):
    small = "name year\nbuzz 1996\nrex 1996\nbo 1997"
    drafts = chunk_elements([Element("text", "intro"), Element("table", small)], text_embedder, 64, 8)
    assert [d.modality for d in drafts] == ["text", "table"] and drafts[1].text == small
    big = "\n".join(f"release {i} codename name{i} year {1990 + i}" for i in range(80))
    parts = [d for d in chunk_elements([Element("table", big)], text_embedder, 64, 8) if d.modality == "table"]
    assert len(parts) > 5
    assert all(text_embedder.count_tokens([p.text])[0] <= 64 for p in parts)
    assert "\n".join(p.text for p in parts) == big  # split between rows, nothing lost or repeated


def test_images_keep_their_place_and_context(text_embedder):
    elements = [Element("text", "before"), Element("image", image=b"x", context=" A caption ", page=4,
                                                      bbox=(1, 2, 3, 4)), Element("text", "after")]
    titled = chunk_elements([Element("title", "One"), Element("text", "a"), Element("image", image=b"x"),
                             Element("title", "Two"), Element("text", "b")], text_embedder, 64, 8)
    assert [(d.modality, d.text.split()[:1]) for d in titled] == [("text", ["One"]), ("image", []),
                                                                  ("text", ["Two"])]
    drafts = chunk_elements(elements, text_embedder, 64, 8)
    assert [d.modality for d in drafts] == ["text", "image"]  # after the text chunk that holds it
    image = next(d for d in drafts if d.modality == "image")
    assert image.context == "A caption" and image.page == 4 and image.bbox == (1, 2, 3, 4)


def test_overlap_must_be_smaller_than_budget(text_embedder):
    with pytest.raises(ValueError, match="overlap"):
        chunk_elements([Element("text", "x")], text_embedder, 16, 16)
