"""Property-based fuzzing (hypothesis, bounded examples): the parsers' entry points and the filter language raise
nothing but the project's documented errors (``BadInputError``) on any input, and what they accept is safe.

- ``sniff_kind`` / ``parse_file`` on mutated and truncated real files of every format and on random bytes;
- the guards they rely on: ``check_image``, ``count_gif_frames``, ``check_zip_archive``, ``decode_text``,
  ``resolve_local_reference`` (never a path outside its root), ``check_remote_url`` (literal addresses);
- ``compile_filter`` on arbitrary text, and on generated valid expressions, whose output real Milvus accepts and
  whose values come back re-quoted (a value cannot inject Milvus syntax).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.elements import Element, ParseOptions
from ingest.parsers import parse_file, sniff_kind
from ingest.parsers._sniff import SUPPORTED_EXTENSIONS, decode_text
from ingest.safety import check_image, check_remote_url, check_zip_archive, count_gif_frames, resolve_local_reference
from mmrag.errors import BadInputError
from retrieval.filters import compile_filter

from hostilecorpus import docx_text, office_zip, pdf_text, small_png

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
OPTIONS = ParseOptions(max_image_pixels=4_000_000, max_archive_bytes=8 * 1024 * 1024)


def _gif() -> bytes:
    from PIL import Image

    frames = [Image.new("P", (20, 20), i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


SEEDS: dict[str, bytes] = {
    ".png": small_png(),
    ".jpg": _jpeg(),
    ".gif": _gif(),
    ".pdf": pdf_text("Fuzzing seed document about vintage cars"),
    ".docx": office_zip("docx", docx_text("A fuzzing seed paragraph.")),
    ".txt": b"Title\n\nA paragraph of plain text about chrome bumpers.\n\n- a list item\n",
    ".md": b"# Heading\n\nSome *markdown* text with a [link](http://example.com) and ![alt](img.png).\n",
    ".html": b"<html><body><h1>Title</h1><p>Paragraph <b>bold</b></p><img src='a.png' alt='x'></body></html>",
}


@st.composite
def mutated(draw, seeds: dict[str, bytes] = SEEDS):
    """(extension, bytes): a seed file truncated and/or with bytes overwritten, inserted or deleted."""
    ext = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[ext])
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[at:at + draw(st.integers(1, 32))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    # Sometimes the wrong extension for the bytes.
    if draw(st.integers(0, 4)) == 0:
        ext = draw(st.sampled_from(sorted(SUPPORTED_EXTENSIONS) + [".exe", ""]))
    return ext, bytes(data)


def _parse(tmp: Path, ext: str, data: bytes) -> None:
    path = tmp / f"fuzz{ext}"
    try:
        elements = parse_file(path, data, OPTIONS)
    except BadInputError as exc:
        assert str(exc).strip() and "\n" not in str(exc)  # a one-line reason
        return
    assert elements and all(isinstance(e, Element) for e in elements)
    for element in elements:
        assert element.kind in ("title", "text", "table", "image")
        if element.kind == "image":
            assert element.image


def test_sniff_kind_takes_any_bytes_and_name():
    @FAST
    @given(name=st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s and "\x00" not in s),
           ext=st.sampled_from(sorted(SUPPORTED_EXTENSIONS) + ["", ".EXE", ".Pdf", ".tar.gz"]),
           data=st.binary(max_size=2048))
    def check(name, ext, data):
        try:
            kind = sniff_kind(Path(name + ext), data)
        except BadInputError:
            return
        assert kind in ("pdf", "docx", "pptx", "html", "markdown", "text", "image")

    check()


def test_parse_file_on_mutated_images_and_text(tmp_path):
    seeds = {k: v for k, v in SEEDS.items() if k in (".png", ".jpg", ".gif", ".txt")}

    @FAST
    @given(case=mutated(seeds))
    def check(case):
        _parse(tmp_path, *case)

    check()


@pytest.mark.slow
def test_parse_file_on_mutated_documents(tmp_path):
    """PDF, DOCX, Markdown and HTML go through unstructured: fewer examples, each slower."""
    seeds = {k: v for k, v in SEEDS.items() if k in (".pdf", ".docx", ".md", ".html")}

    @SLOW
    @given(case=mutated(seeds))
    def check(case):
        _parse(tmp_path, *case)

    check()


def test_parse_file_on_random_bytes(tmp_path):
    @FAST
    @given(ext=st.sampled_from(sorted(SUPPORTED_EXTENSIONS)), data=st.binary(max_size=512))
    def check(ext, data):
        _parse(tmp_path, ext, data)

    check()


def test_image_and_archive_guards():
    @FAST
    @given(case=mutated({k: SEEDS[k] for k in (".png", ".gif", ".jpg", ".docx")}))
    def check(case):
        _, data = case
        for guard in (lambda: check_image(data, 1_000_000), lambda: count_gif_frames(data),
                      lambda: check_zip_archive(data, 1 << 20, 200.0)):
            try:
                guard()
            except BadInputError:
                pass

    check()


def test_decode_text_strict_raises_only_bad_input():
    @FAST
    @given(data=st.binary(max_size=512))
    def check(data):
        try:
            assert isinstance(decode_text(data), str)
        except BadInputError:
            pass

    check()


def test_local_references_never_leave_their_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "in.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"y")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    parts = st.sampled_from(["..", ".", "sub", "in.png", "outside.png", "link.png", "", "/", "//", "\x00", "%2e",
                             str(tmp_path), "~", "root"])

    @FAST
    @given(pieces=st.lists(parts, max_size=6), extra=st.text(max_size=8))
    def check(pieces, extra):
        reference = "/".join(pieces) + extra
        try:
            resolved = resolve_local_reference(reference, root / "sub", root)
        except BadInputError:
            return
        assert resolved.is_relative_to(root.resolve()) and resolved.is_file()

    check()


def test_remote_url_check_refuses_every_non_public_literal():
    import ipaddress

    @FAST
    @given(address=st.ip_addresses(), scheme=st.sampled_from(["http", "https", "ftp", "file", "gopher"]),
           port=st.integers(1, 65535))
    def check(address, scheme, port):
        host = f"[{address}]" if address.version == 6 else str(address)
        url = f"{scheme}://{host}:{port}/x.png"
        try:
            accepted = check_remote_url(url)
        except BadInputError:
            return
        assert scheme in ("http", "https")
        for ip in accepted:
            ip = ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
            assert ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast)

    check()


# ---------------------------------------------------------------------------------------------------------------
# The filter language
# ---------------------------------------------------------------------------------------------------------------


def test_compile_filter_on_arbitrary_text():
    alphabet = st.sampled_from(list("()[],=!<>\"'\\ .-_*%") + ["and", "or", "not", "in", "like", "page", "source",
                                                               "meta.k", "tenant", "1", "2.5", "true", "x"])

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(text=st.one_of(st.text(max_size=60), st.lists(alphabet, max_size=20).map(" ".join)))
    def check(text):
        try:
            out = compile_filter(text)
        except BadInputError as exc:
            assert str(exc)
            return
        assert isinstance(out, str)
        assert "tenant" not in out

    check()


# Any text but control characters (those are refused: see test_control_characters_in_values_are_refused).
VALUES = st.text(st.one_of(st.characters(exclude_categories=("Cc", "Cs")), st.sampled_from("\n\t\r\\\"'")),
                 max_size=12)
FIELDS = st.sampled_from(["source", "doc_id", "id", "modality", "meta.title", "meta.category"])


def _quoted(value: str) -> str:
    """A string literal of the filter language: a backslash escapes the next character."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def expressions(draw, depth: int = 0):
    """(filter text, the string values it holds)."""
    if depth < 2 and draw(st.booleans()):
        left, lv = draw(expressions(depth + 1))
        right, rv = draw(expressions(depth + 1))
        op = draw(st.sampled_from(["and", "or"]))
        text = f"({left}) {op} ({right})"
        return (f"not {text}" if draw(st.booleans()) else text), lv + rv
    kind = draw(st.sampled_from(["cmp", "in", "like", "page"]))
    if kind == "page":
        return f"page {draw(st.sampled_from(['==', '!=', '<', '<=', '>', '>=']))} {draw(st.integers(-5, 999))}", []
    field = draw(FIELDS)
    values = draw(st.lists(VALUES, min_size=1, max_size=3))
    quoted = [_quoted(v) for v in values]
    if kind == "cmp":
        return f"{field} {draw(st.sampled_from(['==', '!=']))} {quoted[0]}", values[:1]
    if kind == "in":
        return f"{field} in [{', '.join(quoted)}]", values
    if field.startswith("meta."):
        return f"{field} == {quoted[0]}", values[:1]
    return f"{field} like {quoted[0]}", []


@pytest.mark.slow
def test_valid_filters_compile_to_expressions_real_milvus_accepts(make_runtime):
    """Generated expressions (values holding quotes, backslashes, operators, unicode) compile; real Milvus runs
    them without a syntax error; every string value comes back re-quoted, so it cannot inject syntax."""
    from mmrag.index import quote

    runtime = make_runtime(clip=False)
    runtime.index.ensure(runtime.models.text_embedder.signature, None)
    client, collection = runtime.index.client, runtime.index.chunks

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(case=expressions())
    def check(case):
        text, values = case
        expr = compile_filter(text)
        for value in values:
            assert quote(value) in expr or json.dumps(value) in expr
        client.query(collection, filter=f'tenant == "t" and ({expr})', output_fields=["id"], limit=1)

    check()


@pytest.mark.parametrize("value", ["\x00", "a\x08b", "\x0c", "\x1b[31m", "\x7f"])
def test_control_characters_in_values_are_refused(value):
    """JSON quoting would write them as \\b, \\f or \\uXXXX escapes, which milvus-lite refuses with a
    server error; the filter language refuses them itself, as bad input."""
    for text in (f'source == "{value}"', f'meta.k in ["x", "{value}"]', f'source like "{value}*"'):
        with pytest.raises(BadInputError, match="control character"):
            compile_filter(text)
