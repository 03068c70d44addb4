"""Guards that run before a parser trusts its input: images, zip archives, local references and remote URLs.

Every check raises ``mmrag.errors.BadInputError`` with a one-line reason and works on the header or the directory
of the input, before anything is decoded or decompressed:

- images: dimensions from the header against a pixel budget (decompression bombs), GIF frame count by walking
  the GIF blocks without decoding them, then a full decode so truncated files fail here and not later;
- zip archives (DOCX, PPTX): total uncompressed size, compression ratio and member count from the central
  directory, before python-docx or python-pptx open the file;
- local references from HTML/Markdown: the resolved path (symlinks followed) must stay inside an allowed root
  and be a regular file;
- remote URLs: only http(s), every address the host resolves to must be globally routable (no loopback, private,
  link-local, multicast, reserved or unspecified address), and the connection goes to the checked address
  itself, so a second DNS answer cannot swap in an internal one; redirects are checked the same way.

Pillow's own ``Image.MAX_IMAGE_PIXELS`` is never changed (it is process-wide); the budget is checked here.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import socket
import ssl
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from PIL import Image

from mmrag.errors import BadInputError

logger = logging.getLogger(__name__)

MAX_GIF_FRAMES = 1000  # GIFs with more frames are refused before Pillow counts them
MAX_ARCHIVE_MEMBERS = 10_000  # DOCX/PPTX with more zip members are refused
MAX_REDIRECTS = 3

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedImage:
    """An image that passed the pixel budget and decoded completely."""

    image: Image.Image  # loaded (first frame for multi-frame formats)
    format: str  # Pillow's format name: PNG, JPEG, GIF, WEBP, BMP, TIFF, ...
    width: int
    height: int
    frames: int


def count_gif_frames(data: bytes, limit: int = MAX_GIF_FRAMES) -> int:
    """Number of image descriptors in a GIF, counted by walking its blocks; stops once ``limit`` is passed.

    Costs one pass over the bytes and decodes nothing (Pillow's ``n_frames`` seeks through every frame).
    Raises BadInputError for a stream that is not a well-formed GIF block sequence.
    """
    if len(data) < 13 or data[:6] not in (b"GIF87a", b"GIF89a"):
        raise BadInputError("not a GIF file")
    pos = 13
    flags = data[10]
    if flags & 0x80:
        pos += 3 * (2 ** ((flags & 0x07) + 1))
    frames = 0
    n = len(data)

    def skip_sub_blocks(p: int) -> int:
        while True:
            if p >= n:
                raise BadInputError("truncated GIF (data ends inside a block)")
            size = data[p]
            p += 1
            if size == 0:
                return p
            p += size

    while pos < n:
        marker = data[pos]
        if marker == 0x3B:  # trailer
            break
        if marker == 0x21:  # extension: label then sub-blocks
            pos = skip_sub_blocks(pos + 2)
        elif marker == 0x2C:  # image descriptor
            frames += 1
            if frames > limit:
                return frames
            if pos + 10 > n:
                raise BadInputError("truncated GIF (data ends inside an image descriptor)")
            local = data[pos + 9]
            pos += 10
            if local & 0x80:
                pos += 3 * (2 ** ((local & 0x07) + 1))
            pos = skip_sub_blocks(pos + 1)  # LZW minimum code size, then image data
        else:
            raise BadInputError(f"corrupt GIF (unexpected block 0x{marker:02x} at byte {pos})")
    return frames


def check_image(data: bytes, max_pixels: int, *, what: str = "image") -> CheckedImage:
    """Open ``data`` with Pillow, check its header size against ``max_pixels``, then decode it fully.

    Raises BadInputError for an unreadable, oversized (decompression bomb), animated-beyond-limit or truncated
    image. ``what`` names the image in messages ("image", "embedded image 'media/image1.png'", ...).
    """
    if not data:
        raise BadInputError(f"{what} is empty")
    if data[:6] in (b"GIF87a", b"GIF89a"):
        frames = count_gif_frames(data)
        if frames > MAX_GIF_FRAMES:
            raise BadInputError(f"{what}: GIF has more than {MAX_GIF_FRAMES} frames")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadInputError(f"{what}: decompression bomb refused ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad input
        raise BadInputError(f"{what}: unreadable image ({type(exc).__name__}: {_one_line(exc)})") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadInputError(f"{what}: invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise BadInputError(
            f"{what}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
            " (decompression bomb?)"
        )
    fmt = image.format or "UNKNOWN"
    frames = 1
    if fmt == "TIFF":
        frames = getattr(image, "n_frames", 1)
    elif fmt == "GIF":
        frames = count_gif_frames(data)
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(f"{what}: truncated or corrupt {fmt} ({type(exc).__name__}: {_one_line(exc)})") from exc
    return CheckedImage(image=image, format=fmt, width=width, height=height, frames=frames)


# ---------------------------------------------------------------------------------------------------------------
# Zip archives (DOCX, PPTX)
# ---------------------------------------------------------------------------------------------------------------


def check_zip_archive(data: bytes, max_bytes: int, max_ratio: float, *, what: str = "archive") -> list[str]:
    """Check a zip's central directory before anything is decompressed; returns the member names.

    Refuses: not a zip or a corrupt directory, more than ``MAX_ARCHIVE_MEMBERS`` members, a total declared
    uncompressed size above ``max_bytes``, or a total uncompressed/compressed ratio above ``max_ratio``.
    (Reading a member never yields more than its declared size: zipfile stops there and fails the CRC.)
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        raise BadInputError(f"{what}: corrupt zip archive ({_one_line(exc)})") from exc
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise BadInputError(f"{what}: {len(infos)} zip members exceed the limit of {MAX_ARCHIVE_MEMBERS}")
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        raise BadInputError(
            f"{what}: uncompressed size {total:,} bytes exceeds the limit of {max_bytes:,} (zip bomb?)"
        )
    ratio = total / max(1, len(data))
    if ratio > max_ratio:
        raise BadInputError(f"{what}: compression ratio {ratio:.0f}:1 exceeds the limit of {max_ratio:g}:1 (zip bomb?)")
    return [info.filename for info in infos]


# ---------------------------------------------------------------------------------------------------------------
# Local references (HTML <img src>, Markdown image links)
# ---------------------------------------------------------------------------------------------------------------


def resolve_local_reference(reference: str | Path, base_dir: Path, allowed_root: Path) -> Path:
    """Resolve a local reference against ``base_dir``; the real path must be a regular file under ``allowed_root``.

    Symlinks are followed before the containment check, so a link inside the tree that points outside is refused.
    """
    root = allowed_root.resolve()
    candidate = Path(reference)
    if not candidate.is_absolute():
        candidate = base_dir / candidate
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops; a NUL byte ("img%00.png") in the name
        raise BadInputError(f"referenced file cannot be resolved: {reference!r}") from exc
    if not resolved.is_relative_to(root):  # checked first: say nothing about what exists outside
        raise BadInputError(f"referenced file {reference} lies outside the document's folder {root}")
    if not resolved.exists():
        raise BadInputError(f"referenced file not found: {reference}")
    if not resolved.is_file():
        raise BadInputError(f"referenced path {reference} is not a regular file")
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# Remote URLs
# ---------------------------------------------------------------------------------------------------------------


def is_public_address(address: IPAddress) -> bool:
    """True for a globally routable unicast address (not loopback, private, link-local, multicast, reserved...)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return is_public_address(address.ipv4_mapped)
    return bool(
        address.is_global
        and not (
            address.is_loopback
            or address.is_private
            or address.is_link_local
            or address.is_multicast
            or address.is_reserved
            or address.is_unspecified
        )
    )


def check_remote_url(url: str) -> list[IPAddress]:
    """Check that ``url`` is http(s) and that every address its host resolves to is public; returns them.

    Raises BadInputError for another scheme, a missing host, a host that does not resolve, or any address that is
    loopback, private, link-local (cloud metadata at 169.254.169.254), multicast, reserved or unspecified.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BadInputError(f"remote URL refused: scheme {parts.scheme or '(none)'!r} is not http or https: {url}")
    host = parts.hostname
    if not host:
        raise BadInputError(f"remote URL refused: no host in {url}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise BadInputError(f"remote URL refused: bad port in {url}") from exc
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise BadInputError(f"remote URL refused: cannot resolve host {host!r} ({_one_line(exc)})") from exc
        addresses = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
    if not addresses:
        raise BadInputError(f"remote URL refused: host {host!r} has no address")
    for address in addresses:
        if not is_public_address(address):
            raise BadInputError(f"remote URL refused: {host} resolves to non-public address {address}")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP connection to a fixed, already checked address (the Host header keeps the URL's host)."""

    def __init__(self, host: str, address: IPAddress, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((str(self._address), self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS connection to a fixed, already checked address; certificate checked against the URL's host."""

    def __init__(self, host: str, address: IPAddress, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((str(self._address), self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def fetch_remote(url: str, *, timeout_s: float, max_bytes: int) -> bytes:
    """GET ``url`` after ``check_remote_url``; at most ``max_bytes`` bytes and ``MAX_REDIRECTS`` checked redirects."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        addresses = check_remote_url(current)
        parts = urlsplit(current)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        connection_cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        connection = connection_cls(host, addresses[0], port, timeout_s)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            connection.request("GET", target, headers={"User-Agent": "mmrag-ingest", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise BadInputError(f"remote image {url}: redirect without Location")
                current = urljoin(current, location)
                continue
            if response.status != 200:
                raise BadInputError(f"remote image {url}: HTTP {response.status}")
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise BadInputError(f"remote image {url}: {declared} bytes exceeds the limit of {max_bytes:,}")
            body = response.read(max_bytes + 1)
            if len(body) > max_bytes:
                raise BadInputError(f"remote image {url}: more than {max_bytes:,} bytes")
            return body
        except (OSError, http.client.HTTPException) as exc:
            raise BadInputError(f"remote image {url}: {type(exc).__name__}: {_one_line(exc)}") from exc
        finally:
            connection.close()
    raise BadInputError(f"remote image {url}: more than {MAX_REDIRECTS} redirects")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
