"""Crash safety of ingestion, reduced: the harness of benchmarks/crash.py (tests/crashharness.py) with 5 SIGKILLs
over a 60-file corpus, plain `mmrag ingest` then `mmrag ingest --sync` after files were removed, changed and
added. The knowledge base must end equal to a clean, uninterrupted run's, chunk for chunk."""

from __future__ import annotations

import random

import numpy as np
import pytest

import crashharness
from conftest import save_clip_folder


@pytest.mark.slow
def test_killed_ingests_end_equal_to_an_uninterrupted_run(tmp_path, shared, tiny_clip):
    clip = save_clip_folder(tiny_clip, tmp_path / "tiny-clip")
    result = crashharness.run_harness(tmp_path, shared, clip, n_files=60, kills=5, sync_epochs=1, seed=1,
                                      startup_kill_share=0.0)
    summary = result.to_json()
    assert result.killed >= 5, summary
    assert summary["kills_during_ingest"] >= 5
    assert [c["after_epoch"] for c in result.checks] == [0, 1]
    for check in result.checks:
        assert crashharness.equal(check), check
    # The sync epoch really changed the knowledge base (files removed, changed and added).
    assert result.epochs[1]["mutation"]["removed"] >= 1 and result.checks[1]["documents"] != 0
    assert result.checks[0]["chunks"] != result.checks[1]["chunks"] or result.checks[0]["blobs"] != result.checks[1][
        "blobs"]


def test_compare_detects_every_kind_of_difference():
    """The comparison the harness relies on fails for a missing, extra, changed or duplicated chunk, a changed
    vector, an orphaned or corrupt blob and a leftover temporary file."""
    rows = {"a": ("a", "d", "text", "x", "blob1"), "b": ("b", "d", "image", "", "ab/" + "f" * 64 + ".png")}
    vectors = {"a": np.zeros(4, np.float32), "b": np.ones(4, np.float32)}
    blobs = {"ab/" + "f" * 64 + ".png": "f" * 64}

    def snap(**changes):
        base = dict(rows=dict(rows), vectors=dict(vectors), documents=[("d", "default", "/x", "v1")],
                    blobs=dict(blobs), referenced={"ab/" + "f" * 64 + ".png"}, duplicate_ids=0, tmp_files=0)
        base.update(changes)
        return crashharness.Snapshot(**base)

    clean = snap()
    assert crashharness.equal(crashharness.compare(snap(), clean))
    broken = [
        snap(rows={"a": rows["a"]}, vectors={"a": vectors["a"]}),
        snap(rows={**rows, "c": rows["a"]}, vectors={**vectors, "c": vectors["a"]}),
        snap(rows={**rows, "a": ("a", "d", "text", "y", "blob1")}),
        snap(vectors={**vectors, "a": np.full(4, 0.01, np.float32)}),
        snap(duplicate_ids=1),
        snap(documents=[("d", "default", "/x", "v0")]),
        snap(blobs={**blobs, "cd/" + "c" * 64 + ".png": "c" * 64}),
        snap(blobs={"ab/" + "f" * 64 + ".png": "0" * 64}),
        snap(tmp_files=1),
    ]
    for snapshot in broken:
        assert not crashharness.equal(crashharness.compare(snapshot, clean)), snapshot


def test_corpus_and_mutation_are_mixed_and_deterministic(tmp_path, shared):
    counts = crashharness.build_corpus(tmp_path / "a", shared, n_files=30, seed=3)
    crashharness.build_corpus(tmp_path / "b", shared, n_files=30, seed=3)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == counts["files"] >= 30
    suffixes = {p.suffix for p in files_a}
    assert {".png", ".md", ".html", ".txt", ".pdf"} <= suffixes
    change = crashharness.mutate_corpus(tmp_path / "a", shared, random.Random(0), fraction=0.2, epoch=1)
    assert change["removed"] == change["changed"] == change["added"] >= 4
    after = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert after != files_a
