"""Telling a file's real format from its bytes (magic numbers), and checking it against the extension.

The extension says what the author claims; the bytes say what the file is. Binary formats (PDF, DOCX, PPTX and
images) are recognised by their signatures; text formats (HTML, Markdown, plain text) by decoding as text, with the
extension choosing among them. A mismatch (a PNG named ``.pdf``, text named ``.png``) is refused with a one-line
reason that names what the bytes look like.
"""

from __future__ import annotations

import codecs
import io
import zipfile
from pathlib import Path

from mmrag.errors import BadInputError

Kind = str  # "pdf" | "docx" | "pptx" | "html" | "markdown" | "text" | "image"

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
EXTENSION_KINDS: dict[str, Kind] = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".pptx": "pptx",
    ".html": "html",
    ".htm": "html",
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    **{ext: "image" for ext in IMAGE_EXTENSIONS},
}
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(EXTENSION_KINDS)

_KIND_LABELS = {
    "pdf": "PDF",
    "docx": "DOCX document",
    "pptx": "PPTX presentation",
    "html": "HTML file",
    "markdown": "Markdown file",
    "text": "text file",
    "image": "supported image",
}
_TEXT_KINDS = frozenset({"html", "markdown", "text"})

# (signature, offset, description); images carry their Pillow-style format name after "image:".
_SIGNATURES: list[tuple[bytes, int, str]] = [
    (b"\x89PNG\r\n\x1a\n", 0, "image:PNG"),
    (b"\xff\xd8\xff", 0, "image:JPEG"),
    (b"GIF87a", 0, "image:GIF"),
    (b"GIF89a", 0, "image:GIF"),
    (b"II*\x00", 0, "image:TIFF"),
    (b"MM\x00*", 0, "image:TIFF"),
    (b"BM", 0, "image:BMP"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", 0, "an OLE2 compound file (legacy .doc/.ppt/.xls or a password-protected"
     " Office file)"),
    (b"\x1f\x8b", 0, "gzip data"),
    (b"7z\xbc\xaf\x27\x1c", 0, "a 7-Zip archive"),
    (b"Rar!\x1a\x07", 0, "a RAR archive"),
    (b"\x7fELF", 0, "an ELF executable"),
    (b"{\\rtf", 0, "an RTF document"),
    (b"\x00\x00\x01\x00", 0, "an ICO icon"),
    (b"ftypheic", 4, "a HEIC image"),
    (b"ftypavif", 4, "an AVIF image"),
    (b"ftyp", 4, "an ISO media file (MP4/MOV/HEIF)"),
    (b"OggS", 0, "Ogg media"),
    (b"fLaC", 0, "a FLAC file"),
    (b"SQLite format 3\x00", 0, "an SQLite database"),
]


def sniff_kind(path: Path, data: bytes) -> Kind:
    """The parser kind for ``data``: "pdf", "docx", "pptx", "html", "markdown", "text" or "image".

    Raises BadInputError for an empty file, an unsupported extension, content that does not match the extension
    ("not a PDF (looks like a PNG image)"), or content of no supported format.
    """
    if not data:
        raise BadInputError("empty file")
    suffix = path.suffix.lower()
    expected = EXTENSION_KINDS.get(suffix)
    if suffix and expected is None:
        supported = ", ".join(sorted(SUPPORTED_EXTENSIONS))
        raise BadInputError(f"unsupported file type {suffix!r} (supported: {supported})")
    actual, description = _content_kind(data)
    if expected is None:  # no extension: trust the content
        if actual is None:
            raise BadInputError(f"unsupported content (looks like {description})")
        if actual == "text" and looks_like_html(data):
            return "html"
        return actual
    if expected in _TEXT_KINDS:
        if actual != "text":
            raise BadInputError(f"not a {_KIND_LABELS[expected]} (looks like {description})")
        return expected
    if actual != expected:
        label = f"{suffix[1:].upper()} image" if expected == "image" else _KIND_LABELS[expected]
        prefix = "an" if label[0] in "AEIOU" else "a"
        raise BadInputError(f"not {prefix} {label} (looks like {description})")
    return expected


def describe(data: bytes) -> str:
    """A few words on what ``data`` looks like, for error messages ("a PNG image", "text", "a ZIP archive")."""
    return _content_kind(data)[1]


def _content_kind(data: bytes) -> tuple[Kind | None, str]:
    """(kind or None, description) from the bytes alone; "text" stands for every text kind."""
    head = data[:1024]
    if b"%PDF-" in head:
        return "pdf", "a PDF"
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        return _zip_kind(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image", "a WEBP image"
    for signature, offset, what in _SIGNATURES:
        if data[offset:offset + len(signature)] == signature:
            if what.startswith("image:"):
                if what == "image:BMP" and not _plausible_bmp(data):
                    continue
                return "image", f"a {what[6:]} image"
            return None, what
    if looks_like_text(data):
        return "text", "HTML" if looks_like_html(data) else "text"
    return None, "unknown binary data"


def _plausible_bmp(data: bytes) -> bool:
    """'BM' starts many text files too: require a sane DIB header size."""
    if len(data) < 26:
        return False
    header_size = int.from_bytes(data[14:18], "little")
    return header_size in (12, 16, 40, 52, 56, 64, 108, 124)


def _zip_kind(data: bytes) -> tuple[Kind | None, str]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        return None, f"a corrupt ZIP archive ({' '.join(str(exc).split())})"
    if "word/document.xml" in names:
        return "docx", "a DOCX document"
    if "ppt/presentation.xml" in names:
        return "pptx", "a PPTX presentation"
    if "xl/workbook.xml" in names:
        return None, "an XLSX spreadsheet"
    if "content.xml" in names and "mimetype" in names:
        return None, "an OpenDocument file"
    if "[Content_Types].xml" in names:
        return None, "an Office Open XML package of another kind"
    return None, "a ZIP archive"


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _bom_encoding(data: bytes) -> str | None:
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding
    return None


def looks_like_text(data: bytes) -> bool:
    """True when the first 8 KiB decode as text: UTF-8/16/32 (BOM), or a single-byte charset without controls."""
    sample = data[:8192]
    encoding = _bom_encoding(sample)
    if encoding is not None:
        try:
            codecs.getincrementaldecoder(encoding)().decode(sample, final=False)
            return True
        except UnicodeDecodeError:
            return False
    if b"\x00" in sample:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
        text_sample = None
    except UnicodeDecodeError:
        text_sample = sample.decode("latin-1")
    if text_sample is None:
        text_sample = sample.decode("utf-8", errors="replace")
    controls = sum(1 for ch in text_sample if ord(ch) < 32 and ch not in "\t\n\r\f\v\x1b")
    return controls <= max(1, len(text_sample) // 100)


def looks_like_html(data: bytes) -> bool:
    """True when the start of a text file reads as an HTML document."""
    head = decode_text(data[:2048], strict=False).lstrip().lower()
    if head.startswith(("<!doctype html", "<html")):
        return True
    return any(tag in head for tag in ("<html", "<head>", "<body"))


def decode_text(data: bytes, *, strict: bool = True) -> str:
    """Decode text bytes: BOM, else UTF-8, else the charset charset-normalizer finds, else cp1252.

    With ``strict`` a result that still holds undecodable bytes raises BadInputError.
    """
    encoding = _bom_encoding(data)
    if encoding is not None:
        return data.decode(encoding, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        from charset_normalizer import from_bytes

        best = from_bytes(data).best()
        if best is not None and best.encoding:
            return str(best)
    except Exception:  # noqa: BLE001 - optional helper; fall through to cp1252
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError as exc:
        if strict:
            raise BadInputError(f"undecodable text (not UTF-8, no charset found: {exc.reason})") from exc
        return data.decode("latin-1")
