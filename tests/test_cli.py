"""The CLI's own output: the source list under an answer, and JSON that stays valid UTF-8 for any file name."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from generation.citations import check_citations
from generation.grounded import GroundedText
from generation.prompting import Source
from mmrag.records import Chunk, Hit

PASSAGE = ("Ford Mustang (1964)\n\nThe Ford Mustang was introduced on 17 April 1964 at the New York World's Fair. It "
           "created the \"pony car\" class:\na long bonnet, a short rear deck,\tand a low price with a long list of "
           "options.")


def _source(n: int, text: str, source: str) -> Source:
    chunk = Chunk(id=f"chunk-{n}", doc_id=f"doc-{n}", modality="text", text=text)
    return Source(n, Hit(chunk=chunk, score=0.8, scores={"dense": 0.8}, source=source))


def test_the_source_list_prints_one_line_per_entry(monkeypatch):
    """A snippet keeps none of the document's line breaks and the list is not wrapped at the console's width, so
    each source and each unsupported sentence is one line (what `grep` and scripts reading the output rely on)."""
    from mmrag import cli

    sources = (_source(1, PASSAGE, "/kb/vintage-cars-1960s.md"),
               _source(2, "The E-Type\nhad disc\n\nbrakes.", "/kb/a-file-with-a-rather-long-name-for-its-sources.md"))
    answer = ("The Mustang was introduced in 1964 [1]. The E-Type had disc brakes [2]. It was\nthe fastest car "
              "of its decade and the best loved one in every country on earth.")
    checked = check_citations(answer, sources)
    result = GroundedText(text=checked.text, citations=checked.citations, unsupported=checked.unsupported,
                          sources=sources)
    buffer = io.StringIO()
    monkeypatch.setattr(cli.out, "file", buffer)
    monkeypatch.setattr(cli.out, "width", 100)  # a narrow terminal (piped, the CLI's console is 160 wide)
    cli._print_sources(result)
    lines = buffer.getvalue().splitlines()
    assert lines == [
        "",
        "Sources:",
        "  [1] vintage-cars-1960s.md: Ford Mustang (1964) The Ford Mustang was introduced on 17 April 1964 at the "
        "New York World's Fair. It created the \"pony car\" class: a long b",
        "  [2] a-file-with-a-rather-long-name-for-its-sources.md: The E-Type had disc brakes.",
        "Not supported by a cited source:",
        "  - It was the fastest car of its decade and the best loved one in every country on earth.",
    ]
    assert len(lines[2]) > 160 and len(lines[5]) > 80  # longer than the console: printed whole, not wrapped


@pytest.mark.slow
def test_ingest_json_names_a_non_utf8_file_in_valid_utf8(tmp_path):
    """A file whose name is not UTF-8 fails on its own (the batch goes on), and `ingest --json` still prints valid
    UTF-8: the name's undecodable bytes appear as \\udcXX text, the same way the failure reason names them."""
    if sys.platform != "linux":
        pytest.skip("needs a file system that accepts any bytes in a name")
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "good.txt").write_text("The Ford Mustang was introduced in April 1964.\n")
    bad = os.fsencode(kb) + b"/latin1-\xe9\xff.txt"
    with open(bad, "wb") as handle:
        handle.write(b"A name that is not UTF-8.\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DO_NOT_TRACK": "1"}
    done = subprocess.run([sys.executable, "-m", "mmrag.cli", "--data-dir", str(tmp_path / "data"), "ingest",
                           str(kb), "--json"], env=env, capture_output=True, timeout=600)
    assert done.returncode == 1, done.stderr.decode(errors="replace")  # one file failed
    report = json.loads(done.stdout.decode("utf-8"))  # strict: raises on any byte that is not UTF-8
    assert report["added"] == 1 and report["chunks"]["text"] == 1
    [failure] = report["failed"]
    assert failure["source"] == f"{kb}/latin1-\\udce9\\udcff.txt"
    assert "('latin1-\\udce9\\udcff.txt')" in failure["reason"] and "not valid UTF-8" in failure["reason"]
