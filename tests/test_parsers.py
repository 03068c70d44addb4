"""Format parsers: every shared third-party document, and every kind of hostile input, made here in tmp_path.

The shared documents are real files from pypdf, python-docx, python-pptx and Debian (see shared/data/README.md);
the assertions name what they really contain. Hostile inputs (bombs, truncations, encryption, lies about the
format) are built by the helpers below, small and fast; nothing here loads a model or touches the network.
"""

from __future__ import annotations

import base64
import difflib
import http.server
import io
import logging
import re
import struct
import threading
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from ingest import safety
from ingest.elements import Element, ParseOptions
from ingest.parsers import SUPPORTED_EXTENSIONS, parse_file, sniff_kind
from mmrag.errors import BadInputError

from conftest import shared_data

OPTIONS = ParseOptions()


DOCS = shared_data() / "docs"
needs_shared = pytest.mark.usefixtures("shared")  # fails, never skips, when ../shared/data is missing


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.setenv("UNSTRUCTURED_DISABLE_NOTICE", "1")


def parse(path: Path, options: ParseOptions = OPTIONS) -> list[Element]:
    return parse_file(path, path.read_bytes(), options)


def kinds(elements: list[Element]) -> Counter[str]:
    return Counter(e.kind for e in elements)


def texts(elements: list[Element]) -> list[str]:
    return [e.text for e in elements if e.kind != "image"]


def images(elements: list[Element]) -> list[Element]:
    return [e for e in elements if e.kind == "image"]


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


# ---------------------------------------------------------------------------------------------------------------
# Hostile and small files, built in memory
# ---------------------------------------------------------------------------------------------------------------


def png_bytes(size: tuple[int, int] = (64, 48), color: str = "red", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(size: tuple[int, int] = (200, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(side: int = 20_000) -> bytes:
    """A valid ~50 KB 1-bit PNG whose header claims side x side pixels (all zero rows, streamed through zlib)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


_GIF_FRAME = b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00"  # one 1x1 image descriptor + LZW data


def many_frames_gif(frames: int) -> bytes:
    return b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00" + _GIF_FRAME * frames + b";"


def animated_gif() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), color) for color in ("red", "green", "blue")]
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def zip_bomb_docx(megabytes: int = 20) -> bytes:
    """A zip with DOCX's marker members and one member of zeros: ~20 KB compressed, 20 MB uncompressed."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", "<w:document/>")
        with archive.open("word/media/huge.bin", "w") as member:
            chunk = b"\0" * (1 << 20)
            for _ in range(megabytes):
                member.write(chunk)
    return buffer.getvalue()


def encrypted_pdf(source: bytes, user_password: str) -> bytes:
    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(source)))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm="AES-256")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def text_pdf(text: str) -> bytes:
    """A valid one-page PDF showing one line of Helvetica text, written byte by byte (xref offsets included)."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    stream = f"BT /F1 12 Tf 20 150 Td ({escaped}) Tj ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------------
# The shared documents
# ---------------------------------------------------------------------------------------------------------------


@needs_shared
def test_crazyones_pdf_text_matches_its_transcript() -> None:
    elements = parse(DOCS / "pdf" / "crazyones.pdf")
    assert kinds(elements)["image"] == 0
    got = words(" ".join(texts(elements)))
    expected = words((DOCS / "pdf" / "crazyones.txt").read_text(encoding="utf-8").translate(
        {0xFB01: "fi", 0xFB00: "ff"}))
    ratio = difflib.SequenceMatcher(a=expected, b=got, autojunk=False).ratio()
    assert ratio >= 0.95, ratio
    assert elements[0].kind == "title" and elements[0].text == "The Crazy Ones"
    assert all(e.page == 1 and e.bbox is not None for e in elements)
    assert "misfits" in got  # the "ﬁ" ligature is undone


@needs_shared
def test_jpeg_pdf_image_has_page_bbox_and_caption_context() -> None:
    elements = parse(DOCS / "pdf" / "jpeg.pdf")
    assert kinds(elements) == {"image": 1, "text": 1}
    image = elements[0]  # the picture sits above its one line of text
    assert image.kind == "image" and image.page == 1
    assert image.bbox == pytest.approx((56.7, 56.6, 538.6, 418.0), abs=0.5)
    assert image.context == "A PDF with a JPEG image."
    assert image.metadata["page_size"] == [595.0, 842.0]
    decoded = Image.open(io.BytesIO(image.image))
    assert decoded.size[0] >= 800 and decoded.mode == "RGBA"  # the soft mask is applied


@needs_shared
def test_imagemagick_pdf_repeated_image_is_kept_once() -> None:
    elements = parse(DOCS / "pdf" / "imagemagick-images.pdf")
    found = images(elements)
    # six pages, one 16x16 image each in six encodings; five decode to the same pixels
    assert len(found) == 2
    assert found[0].metadata["pages"] == [1, 2, 3, 5, 6]
    assert found[1].page == 4 and found[1].metadata["format"] == "JPEG"
    for image in found:
        assert image.bbox == pytest.approx((0.0, 0.0, 3.84, 3.84), abs=0.01)
        assert (image.metadata["width"], image.metadata["height"]) == (16, 16)


@needs_shared
def test_subfigure_pdf_images_get_subcaption_and_figure_caption() -> None:
    elements = parse(DOCS / "pdf" / "side-by-side-subfig.pdf")
    coati, bear = images(elements)
    assert coati.context == "(a) South American coati — Figure 1.1: Bears"
    assert bear.context == "(b) Brown bear — Figure 1.1: Bears"
    assert coati.metadata["context_source"] == "caption"
    assert coati.image[:3] == b"\xff\xd8\xff" and coati.metadata["width"] == 1800  # the original JPEG stream
    order = [e.text or e.context for e in elements]
    assert order.index(coati.context) < order.index("(a) South American coati")  # image before its caption


@needs_shared
def test_example_pdf_text_table_and_image() -> None:
    elements = parse(DOCS / "pdf" / "example.pdf")
    assert elements[0].text == "Example document"
    assert "Jakarta" in texts(elements) and "Vienna" in texts(elements)
    (image,) = images(elements)
    assert image.page == 1 and image.bbox == pytest.approx((427.5, 150.47, 523.5, 246.47), abs=0.5)
    assert image.context.startswith("Beautiful is better than ugly.")


@needs_shared
def test_multilang_pdf_keeps_every_script() -> None:
    joined = " ".join(texts(parse(DOCS / "pdf" / "multilang.pdf")))
    for phrase in ("Hello World", "Привет, мир", "你好世界", "こんにちは世界", "สวัสดีชาวโลก"):
        assert phrase in joined


@needs_shared
def test_geobase_pdf_logos_and_diagram() -> None:
    elements = parse(DOCS / "pdf" / "GeoBase_NHNC1_Data_Model_UML_EN.pdf")
    found = images(elements)
    assert [i.page for i in found] == [1, 1, 9]
    assert found[2].context == "3.1.1 Logical view"
    assert found[2].bbox == pytest.approx((72.16, 157.51, 539.96, 538.01), abs=0.5)
    assert "Figure 1 – Specifications expansion" in texts(elements)
    assert max(e.page or 0 for e in elements) == 19


@needs_shared
def test_debian_history_pdf_drops_running_heads() -> None:
    elements = parse(DOCS / "pdf" / "debian-project-history.en.pdf")
    assert kinds(elements)["image"] == 0
    assert {e.page for e in elements} >= set(range(3, 28))
    joined = " ".join(texts(elements))
    assert "Debian Project was officially founded by Ian Murdock" in joined
    # the running head appears on every page; it is kept on the title page only
    assert texts(elements).count("A Brief History of Debian") <= 2


@needs_shared
def test_docx_with_five_inline_pictures_of_three_images() -> None:
    elements = parse(DOCS / "office" / "having-images.docx")
    assert all(e.kind == "image" for e in elements)
    assert [e.metadata["source"] for e in elements] == [f"word/media/image{i}.png" for i in (1, 2, 3)]
    # no alt text and no paragraphs: the context is the inserted file's name in words
    assert [e.context for e in elements] == ["python", "monty truth", "python powered"]
    assert all(e.metadata["context_source"] == "filename" for e in elements)


@needs_shared
def test_docx_hyperlink_paragraphs() -> None:
    elements = parse(DOCS / "office" / "par-hyperlinks.docx")
    assert texts(elements) == ["No hyperlinks", "One awesome hyperlink.", "Three hyperlinks: the first one",
                               "here, the second one, and the third."]
    assert [e.page for e in elements] == [1, 1, 1, 2]


@needs_shared
def test_docx_whose_tables_are_all_empty_has_nothing_to_extract() -> None:
    # tbl-having-tables.docx holds three tables (2x2, 3x3, 2x4) whose cells are all empty
    with pytest.raises(BadInputError, match="no extractable text"):
        parse(DOCS / "office" / "tbl-having-tables.docx")


@needs_shared
def test_pptx_pictures_have_slide_page_bbox_and_context() -> None:
    elements = parse(DOCS / "office" / "shp-picture.pptx")
    first, second = images(elements)  # two pictures per slide, each pair showing one image twice
    assert first.page == 1 and second.page == 2
    assert first.bbox == pytest.approx((159.59, 242.0, 299.59, 298.0), abs=0.01)  # points
    assert first.metadata["page_size"] == [720.0, 540.0]
    assert first.context == "python powered"  # alt text "python-powered.png" is just a file name
    assert first.metadata["source"] == "ppt/media/image1.png"


@needs_shared
def test_pptx_speaker_notes_are_marked() -> None:
    (notes,) = parse(DOCS / "office" / "sld-notes.pptx")
    assert notes.text == "Notes" and notes.page == 1 and notes.metadata["notes"] is True


@needs_shared
def test_pptx_tables() -> None:
    elements = parse(DOCS / "office" / "tbl-cell.pptx")
    assert [(e.kind, e.page) for e in elements] == [("table", 1), ("table", 2), ("table", 2), ("table", 3)]
    assert elements[0].text.startswith("having custom margins")
    assert elements[3].text == "a b c d e f g h i"


DEBIAN_HTML = {  # page -> (alt texts of its local images, a sentence of its text)
    "index.en.html": (["Next"], "This document may be freely redistributed or modified"),
    "intro.en.html": (["Prev", "Next", "Home"], "The Debian Project was officially founded by Ian Murdock"),
    "leaders.en.html": (["Prev", "Next", "Home"], "Bruce Perens led Debian from April 1996 until December 1997."),
    "releases.en.html": (["Prev", "Next", "Home"], "Debian 1.1 Buzz (June 17th, 1996)"),
    "detailed.en.html": (["Prev", "Next", "Home"], "The Early Debian Packaging System"),
    "manifesto.en.html": (["Prev", "Home"], "Debian Linux is a brand-new kind of Linux distribution."),
}


@needs_shared
@pytest.mark.parametrize("name", sorted(DEBIAN_HTML))
def test_debian_history_html_text_and_local_images(name: str) -> None:
    alts, sentence = DEBIAN_HTML[name]
    elements = parse(DOCS / "html" / "debian-history" / name)
    found = images(elements)
    assert [i.context for i in found] == alts  # navigation icons, each kept once per page
    assert all(i.metadata["source"].startswith("images/") and i.metadata["context_source"] == "alt" for i in found)
    assert any(sentence in t for t in texts(elements))
    assert kinds(elements)["title"] >= 1


@needs_shared
def test_plain_text_files_group_wrapped_lines() -> None:
    contract = parse(DOCS / "social-contract.txt")
    assert any(t.startswith("1. Debian will remain 100% free We provide the guidelines") for t in texts(contract))
    assert len(contract) < 40  # 150 wrapped lines become paragraphs, not one element per line
    manifesto = parse(DOCS / "debian-manifesto.txt")
    assert any("Debian Linux is a brand-new kind of Linux distribution." in t for t in texts(manifesto))
    assert not any(set(t) <= set("*=_- ") for t in texts(manifesto))  # decoration lines dropped


@needs_shared
def test_every_shared_document_parses() -> None:
    failures = {}
    files = [p for p in DOCS.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS]
    assert len(files) >= 25
    for path in files:
        try:
            elements = parse(path)
        except BadInputError as exc:
            failures[path.name] = str(exc)
            continue
        assert elements, path
        for element in elements:
            assert element.kind in ("title", "text", "table", "image")
            assert (element.image is not None) == (element.kind == "image")
    assert failures == {"tbl-having-tables.docx": "no extractable text or images in this docx file"}


@needs_shared
def test_image_file_context_from_name_and_sidecar(tmp_path: Path) -> None:
    source = shared_data() / "tuxpaint" / "images" / "0002_peacock.png"
    (image,) = parse(source)
    assert image.kind == "image" and image.context == "peacock"
    assert image.image == source.read_bytes()  # PNG kept as given
    copy = tmp_path / "0002_peacock.png"
    copy.write_bytes(source.read_bytes())
    (tmp_path / "0002_peacock.txt").write_text("A peacock (a male peafowl).\n", encoding="utf-8")
    (image,) = parse(copy)
    assert image.context == "peacock\nA peacock (a male peafowl)."
    assert image.metadata["context_source"] == "sidecar"


# ---------------------------------------------------------------------------------------------------------------
# Sniffing
# ---------------------------------------------------------------------------------------------------------------


def test_supported_extensions() -> None:
    assert SUPPORTED_EXTENSIONS == frozenset({".pdf", ".docx", ".pptx", ".html", ".htm", ".md", ".markdown",
                                              ".txt", ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif",
                                              ".tiff"})


@pytest.mark.parametrize(("name", "data", "kind"), [
    ("a.png", png_bytes(), "image"),
    ("a.jpg", png_bytes(), "image"),  # another image format under an image extension is fine
    ("noext", png_bytes(), "image"),
    ("page.htm", b"<p>hi</p>", "html"),
    ("notes.md", b"# Title\n", "markdown"),
    ("notes.txt", "caf\xe9 cr\xe8me".encode("cp1252"), "text"),
    ("README", b"<!DOCTYPE html><html><body>x</body></html>", "html"),
    ("utf16.txt", "hello".encode("utf-16"), "text"),
])
def test_sniff_kind(name: str, data: bytes, kind: str) -> None:
    assert sniff_kind(Path(name), data) == kind


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("empty.pdf", b"", "empty file"),
    ("picture.pdf", png_bytes(), "not a PDF (looks like a PNG image)"),
    ("words.png", b"just some words, not pixels", "not a PNG image (looks like text)"),
    ("words.docx", b"just text", "not a DOCX document (looks like text)"),
    ("broken.docx", b"PK\x03\x04" + b"x" * 100, "not a DOCX document (looks like a corrupt ZIP archive"),
    ("plain.docx", None, "not a DOCX document (looks like a ZIP archive)"),
    ("legacy.docx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 100, "looks like an OLE2 compound file"),
    ("binary.txt", b"\x00\x01\x02\x03" * 20, "not a text file (looks like unknown binary data)"),
    ("sheet.csv", b"a,b\n1,2\n", "unsupported file type '.csv'"),
])
def test_sniff_refuses(name: str, data: bytes | None, reason: str) -> None:
    if data is None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("hello.txt", "hi")
        data = buffer.getvalue()
    with pytest.raises(BadInputError) as caught:
        parse_file(Path(name), data, OPTIONS)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


@needs_shared
def test_pptx_named_docx_is_refused() -> None:
    data = (DOCS / "office" / "sld-notes.pptx").read_bytes()
    with pytest.raises(BadInputError, match=r"not a DOCX document \(looks like a PPTX presentation\)"):
        parse_file(Path("deck.docx"), data, OPTIONS)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: each refused with a one-line reason
# ---------------------------------------------------------------------------------------------------------------


@needs_shared
def test_truncated_and_corrupt_pdf() -> None:
    source = (DOCS / "pdf" / "crazyones.pdf").read_bytes()
    with pytest.raises(BadInputError, match="corrupt or truncated PDF"):
        parse_file(Path("cut.pdf"), source[: len(source) // 2], OPTIONS)
    with pytest.raises(BadInputError, match="corrupt or truncated PDF"):
        parse_file(Path("junk.pdf"), b"%PDF-1.4\n" + b"junk " * 100, OPTIONS)


@needs_shared
def test_encrypted_pdf_needs_a_password_but_owner_only_encryption_parses() -> None:
    source = (DOCS / "pdf" / "crazyones.pdf").read_bytes()
    with pytest.raises(BadInputError, match="^encrypted PDF"):
        parse_file(Path("locked.pdf"), encrypted_pdf(source, "secret"), OPTIONS)
    elements = parse_file(Path("restricted.pdf"), encrypted_pdf(source, ""), OPTIONS)
    assert elements[0].text == "The Crazy Ones"


def test_pdf_without_text_or_images() -> None:
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument.new()
    document.new_page(200, 200)
    buffer = io.BytesIO()
    document.save(buffer)
    with pytest.raises(BadInputError, match=r"no extractable text or images \(scanned PDF\? OCR is not enabled\)"):
        parse_file(Path("blank.pdf"), buffer.getvalue(), OPTIONS)


def test_pdf_text_written_here_is_extracted() -> None:
    elements = parse_file(Path("made.pdf"), text_pdf("Grounded retrieval works offline."), OPTIONS)
    assert texts(elements) == ["Grounded retrieval works offline."]
    assert elements[0].page == 1 and elements[0].bbox is not None


def test_decompression_bomb_png_is_refused_from_its_header() -> None:
    bomb = bomb_png()
    assert len(bomb) < 100_000
    with pytest.raises(BadInputError, match="decompression bomb"):
        parse_file(Path("bomb.png"), bomb, OPTIONS)


def test_pixel_limit_is_the_options_limit() -> None:
    # Pillow's process-wide MAX_IMAGE_PIXELS is not ours to change (unstructured's pdf module raises it to 5e8 on
    # import); the budget that counts is ParseOptions.max_image_pixels.
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadInputError, match=r"64x48 = 3,072 pixels exceeds the limit of 1,000"):
        parse_file(Path("small.png"), png_bytes(), ParseOptions(max_image_pixels=1_000))
    assert Image.MAX_IMAGE_PIXELS == before


def test_zip_bomb_docx_is_refused_before_decompression() -> None:
    bomb = zip_bomb_docx()
    assert len(bomb) < 100_000
    with pytest.raises(BadInputError, match=r"DOCX: compression ratio \d+:1 exceeds the limit of 200:1"):
        parse_file(Path("bomb.docx"), bomb, OPTIONS)
    lenient = ParseOptions(max_archive_ratio=10_000, max_archive_bytes=10 * 1024 * 1024)
    with pytest.raises(BadInputError, match=r"DOCX: uncompressed size 20,971,\d+ bytes exceeds the limit"):
        parse_file(Path("bomb.docx"), bomb, lenient)


def test_truncated_jpeg() -> None:
    data = jpeg_bytes()
    with pytest.raises(BadInputError, match="truncated or corrupt JPEG"):
        parse_file(Path("cut.jpg"), data[: len(data) // 2], OPTIONS)


def test_gif_frame_limit_and_animated_gif_first_frame() -> None:
    with pytest.raises(BadInputError, match="GIF has more than 1000 frames"):
        parse_file(Path("flood.gif"), many_frames_gif(1001), OPTIONS)
    (image,) = parse_file(Path("anim.gif"), animated_gif(), OPTIONS)
    assert image.metadata["format"] == "PNG" and image.metadata["source_format"] == "GIF"
    assert Image.open(io.BytesIO(image.image)).size == (32, 32)
    (still,) = parse_file(Path("one.gif"), many_frames_gif(1), OPTIONS)
    assert still.metadata["format"] == "GIF"


def test_count_gif_frames_rejects_garbage() -> None:
    assert safety.count_gif_frames(many_frames_gif(5)) == 5
    with pytest.raises(BadInputError, match="truncated GIF"):
        safety.count_gif_frames(many_frames_gif(3)[:-4])


def test_unexpected_parser_exception_becomes_one_line_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    import ingest.parsers.plain as plain

    def explode(path: Path, data: bytes, options: ParseOptions) -> list[Element]:
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(plain, "parse_text", explode)
    with pytest.raises(BadInputError, match=r"^cannot parse text: ValueError: boom second line$"):
        parse_file(Path("a.txt"), b"hello", OPTIONS)


# ---------------------------------------------------------------------------------------------------------------
# Markdown and HTML images
# ---------------------------------------------------------------------------------------------------------------


def test_markdown_image_links(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png_bytes((40, 40), "red"))
    (tmp_path.parent / "outside.png").write_bytes(png_bytes((40, 40), "blue"))
    doc = tmp_path / "notes.md"
    doc.write_text(
        "# Colours\n\nA paragraph about red things.\n\n![A red square](img/red.png)\n\n"
        "Between the pictures.\n\n![](../outside.png)\n\n![remote](https://example.com/x.png)\n\n"
        "![missing](img/none.png)\n\nThe end.\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="ingest.parsers.web"):
        elements = parse(doc)
    assert [(e.kind, e.text or e.context) for e in elements] == [
        ("title", "Colours"), ("text", "A paragraph about red things."), ("image", "A red square"),
        ("text", "Between the pictures."), ("text", "The end.")]
    assert elements[2].metadata["source"] == "img/red.png"
    log = caplog.text
    assert "outside the document's folder" in log  # ../outside.png refused
    assert "not fetched (fetch_remote is off)" in log
    assert "referenced file not found: img/none.png" in log


def test_html_images_alt_caption_paragraph_and_data_uri(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "fig.png").write_bytes(png_bytes((50, 30), "green"))
    (tmp_path / "sub" / "inline.png").write_bytes(png_bytes((30, 30), "yellow"))
    (tmp_path / "bomb.png").write_bytes(bomb_png(12_000))
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes((20, 20), "blue")).decode()
    (tmp_path / "page.html").write_text(f"""<!DOCTYPE html><html><head><title>T</title></head><body>
<h1>Gallery</h1>
<p>First paragraph of the gallery page.</p>
<figure><img src="fig.png"><figcaption>Figure 1: a green bar</figcaption></figure>
<p>Inline picture <img src="sub/inline.png"> inside a sentence of text.</p>
<img alt="A blue square" src="{data_uri}">
<img src="http://example.com/remote.png" alt="remote">
<img src="bomb.png" alt="bomb">
<img src="file:///etc/hostname" alt="system file">
<p>Closing paragraph.</p>
</body></html>""", encoding="utf-8")
    with caplog.at_level(logging.INFO):
        elements = parse(tmp_path / "page.html")
    found = images(elements)
    assert [(i.context, i.metadata["context_source"]) for i in found] == [
        ("Figure 1: a green bar", "caption"),
        ("Inline picture inside a sentence of text.", "paragraph"),
        ("A blue square", "alt")]
    assert found[2].metadata["source"] == "data-uri"
    order = [e.kind for e in elements]
    assert order.index("image") > texts(elements).index("First paragraph of the gallery page.")
    assert elements[-1].text == "Closing paragraph."
    assert "decompression bomb" in caplog.text and "outside the document's folder" in caplog.text


def test_html_symlink_out_of_the_tree_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "private.png").write_bytes(png_bytes())
    site = tmp_path / "site"
    site.mkdir()
    (site / "link.png").symlink_to(secret / "private.png")
    (site / "index.html").write_text('<p>Text here.</p><img src="link.png" alt="linked">', encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        elements = parse(site / "index.html")
    assert images(elements) == []
    assert "outside the document's folder" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Remote URLs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png",
    "http://localhost:8080/x.png",
    "http://10.0.0.1/x.png",
    "http://192.168.1.20/x.png",
    "http://172.16.5.4/x.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/x.png",
    "http://[::ffff:127.0.0.1]/x.png",
    "http://[fe80::1]/x.png",
    "http://0.0.0.0/x.png",
    "http://224.0.0.1/x.png",
    "http://100.64.0.1/x.png",
])
def test_check_remote_url_refuses_non_public_addresses(url: str) -> None:
    with pytest.raises(BadInputError, match="remote URL refused: .* non-public address"):
        safety.check_remote_url(url)


@pytest.mark.parametrize("url", ["ftp://example.com/x.png", "file:///etc/passwd", "gopher://x", "http:///x.png"])
def test_check_remote_url_refuses_other_schemes_and_missing_hosts(url: str) -> None:
    with pytest.raises(BadInputError, match="remote URL refused"):
        safety.check_remote_url(url)


def test_check_remote_url_accepts_a_public_literal_address() -> None:
    assert [str(a) for a in safety.check_remote_url("https://93.184.216.34/x.png")] == ["93.184.216.34"]


def test_fetch_remote_on_still_never_reaches_a_loopback_server(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    hits: list[str] = []
    picture = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(picture)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        page = tmp_path / "remote.html"
        page.write_text(f'<p>Some text.</p><img src="http://127.0.0.1:{port}/a.png" alt="loopback">'
                        f'<img src="http://localhost:{port}/b.png" alt="named loopback">', encoding="utf-8")
        with caplog.at_level(logging.WARNING):
            elements = parse(page, ParseOptions(fetch_remote=True, remote_timeout_s=2.0))
        with pytest.raises(BadInputError, match="non-public address 127.0.0.1"):
            safety.fetch_remote(f"http://127.0.0.1:{port}/c.png", timeout_s=2.0, max_bytes=1000)
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()
    assert images(elements) == [] and hits == []
    assert caplog.text.count("non-public address") == 2


# ---------------------------------------------------------------------------------------------------------------
# Safety helpers and the offline NLP stand-in
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_local_reference(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    assert safety.resolve_local_reference("a.png", tmp_path, tmp_path) == (tmp_path / "a.png").resolve()
    with pytest.raises(BadInputError, match="outside"):
        safety.resolve_local_reference("../x.png", tmp_path / "dir", tmp_path / "dir")
    with pytest.raises(BadInputError, match="not a regular file"):
        safety.resolve_local_reference("dir", tmp_path, tmp_path)


def test_check_zip_archive_member_limit() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(safety.MAX_ARCHIVE_MEMBERS + 1):
            archive.writestr(f"m{i}", b"")
    with pytest.raises(BadInputError, match="zip members exceed the limit"):
        safety.check_zip_archive(buffer.getvalue(), 1 << 30, 1000.0)


def test_offline_nlp_is_idempotent_and_lets_unstructured_classify() -> None:
    import spacy.util

    from ingest.nlp import ensure_offline_nlp

    first = ensure_offline_nlp()
    assert ensure_offline_nlp() == first
    assert first == ("en_core_web_sm" if spacy.util.is_package("en_core_web_sm") else "blank-en")
    from unstructured.nlp.tokenize import pos_tag, sent_tokenize
    from unstructured.partition.text_type import is_possible_narrative_text

    assert sent_tokenize("One sentence here. Another one follows.") == ["One sentence here.",
                                                                       "Another one follows."]
    assert any(tag.startswith("VB") for _, tag in pos_tag("The images were extracted by the parser"))
    assert is_possible_narrative_text("The parser is fast.")


# ---------------------------------------------------------------------------------------------------------------
# DOCX and PPTX built here: alt text, captions, reading order, group transforms, notes
# ---------------------------------------------------------------------------------------------------------------


def test_docx_alt_text_caption_and_reading_order(tmp_path: Path) -> None:
    import docx
    from docx.shared import Inches

    document = docx.Document()
    document.add_heading("Field report", level=1)
    document.add_paragraph("The survey started at dawn near the river.")
    document.add_picture(io.BytesIO(png_bytes((60, 40), "red")), width=Inches(1))
    document.inline_shapes[0]._inline.docPr.set("descr", "A red survey marker")
    document.add_picture(io.BytesIO(png_bytes((60, 40), "blue")), width=Inches(1))
    document.add_paragraph("Figure 2: the blue tarp at the camp", style="Caption")
    table = document.add_table(rows=2, cols=2)
    for row, values in zip(table.rows, (("Site", "Depth"), ("A", "3 m")), strict=True):
        for cell, value in zip(row.cells, values, strict=True):
            cell.text = value
    document.add_paragraph("The team left at dusk.")
    path = tmp_path / "report.docx"
    document.save(path)

    elements = parse(path)
    summary = [(e.kind, e.text or e.context) for e in elements]
    assert summary == [
        ("title", "Field report"),
        ("text", "The survey started at dawn near the river."),
        ("image", "A red survey marker"),
        ("image", "Figure 2: the blue tarp at the camp"),
        ("text", "Figure 2: the blue tarp at the camp"),
        ("table", "Site Depth A 3 m"),
        ("text", "The team left at dusk."),
    ]
    assert [e.metadata.get("context_source") for e in images(elements)] == ["alt", "caption"]


def test_pptx_group_picture_title_context_and_notes(tmp_path: Path) -> None:
    import pptx
    from pptx.util import Inches

    presentation = pptx.Presentation()
    slide = presentation.slides.add_slide(presentation.slide_layouts[5])  # "Title Only"
    slide.shapes.title.text = "Quarterly harvest"
    box = slide.shapes.add_textbox(Inches(1), Inches(5), Inches(4), Inches(1))
    box.text_frame.text = "Apples outsold pears this quarter."
    group = slide.shapes.add_group_shape()
    group.shapes.add_picture(io.BytesIO(png_bytes((80, 80), "green")), Inches(1), Inches(2), Inches(1), Inches(1))
    offset = group._element.grpSpPr.find(
        "{http://schemas.openxmlformats.org/drawingml/2006/main}xfrm/"
        "{http://schemas.openxmlformats.org/drawingml/2006/main}off")
    offset.set("x", str(Inches(3)))  # move the group 2 inches right of its children's own coordinates
    described = slide.shapes.add_picture(io.BytesIO(png_bytes((80, 80), "red")), Inches(6), Inches(2),
                                         Inches(1), Inches(1))
    described._element.nvPicPr.cNvPr.set("descr", "A red apple on a table")
    slide.notes_slide.notes_text_frame.text = "Mention the drought in July."
    path = tmp_path / "deck.pptx"
    presentation.save(path)

    elements = parse(path)
    summary = [(e.kind, e.text or e.context) for e in elements]
    assert summary == [
        ("title", "Quarterly harvest"),
        ("image", "Quarterly harvest — Apples outsold pears this quarter."),
        ("image", "A red apple on a table"),
        ("text", "Apples outsold pears this quarter."),
        ("text", "Mention the drought in July."),
    ]
    grouped, described_image = images(elements)
    assert grouped.bbox == pytest.approx((216.0, 144.0, 288.0, 216.0))  # group transform applied, in points
    assert described_image.bbox == pytest.approx((432.0, 144.0, 504.0, 216.0))
    assert all(e.page == 1 for e in elements)
    assert elements[-1].metadata["notes"] is True


def test_importing_the_parsers_has_no_side_effects() -> None:
    import subprocess
    import sys

    code = ("import os, sys; before = dict(os.environ); import ingest.parsers, ingest.safety, ingest.nlp; "
            "heavy = [m for m in ('unstructured', 'spacy', 'docx', 'pptx', 'pypdfium2') if m in sys.modules]; "
            "assert not heavy, heavy; assert dict(os.environ) == before")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_html_nested_too_deeply_is_refused_before_parsing_while_real_markup_passes():
    """200,000 nested <div> once took 11 s and gigabytes inside the parser; the check refuses it up front, and
    does not count elements that never nest, optional end tags, comments or script text."""
    from ingest.parsers.web import MAX_HTML_DEPTH, check_html_nesting

    with pytest.raises(BadInputError, match="nested too deeply"):
        check_html_nesting("<html><body>" + "<div>" * 200_000 + "x" + "</div>" * 200_000)
    with pytest.raises(BadInputError, match="nested too deeply"):
        check_html_nesting("<span><b><i>" * (MAX_HTML_DEPTH // 3 + 1))
    for fine in ("<div>" * MAX_HTML_DEPTH + "x",
                 "<ul>" + "<li><p>item" * 5_000 + "</ul>",  # left-open <li> and <p> close at their next sibling
                 "<script>" + "'<div>' + " * 3_000 + "</script><div>ok</div>",
                 "<!--" + "<div>" * 3_000 + "-->" + "<br/><img src=x>" * 10,
                 "<div></div>" * 100_000):
        check_html_nesting(fine)


def test_parsing_sends_no_usage_reports():
    """unstructured reports usage over the network (on import, after running nvidia-smi, and per partitioned file)
    unless opted out; the ingest package opts out for a process that did not, and leaves a user's choice alone."""
    import os
    import subprocess
    import sys

    probe = (
        "import subprocess, threading\n"
        "started = []\n"
        "real_start, real_run = threading.Thread.start, subprocess.run\n"
        "threading.Thread.start = lambda self: (started.append(self.name), real_start(self))[1]\n"
        "subprocess.run = lambda args, *a, **k: (started.append(str(args)), real_run(args, *a, **k))[1]\n"
        "from pathlib import Path\n"
        "from ingest.elements import ParseOptions\n"
        "from ingest.parsers import parse_file\n"
        "text = b'The ferry leaves at nine.\\n\\nIt returns at noon.\\n'\n"
        "elements = parse_file(Path('a.txt'), text, ParseOptions())\n"
        "import os\n"
        "print(len(elements), os.environ.get('DO_NOT_TRACK'), sorted(set(started)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DO_NOT_TRACK", "SCARF_NO_ANALYTICS")}
    env["UNSTRUCTURED_DISABLE_NOTICE"] = "1"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2 1 []"
    # A value the user set is kept (here an opt-out of their own).
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "DO_NOT_TRACK": "true"}, capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.strip() == "2 true []", out.stderr
