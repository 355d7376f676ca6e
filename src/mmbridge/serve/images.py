"""Turning an untrusted `image_url` into a PIL image, safely.

Default: only `data:image/...;base64,...` URLs. Remote http(s) fetching is off unless configured,
and even then only for allowlisted hosts, with every redirect hop re-checked (scheme, host,
resolved address must be public) and the connection pinned to the checked address so a second
DNS answer cannot point it elsewhere. `file://` and local paths are never read: a server must not
open files because a request names them.

Decoding is guarded in layers: byte cap before base64 decoding, strict base64 alphabet, a format
allowlist given to `Image.open` (other decoders are never tried), and the pixel count read from
the header *before* any pixel is decoded, so a tiny file claiming 30000x30000 px costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin

from PIL import Image, UnidentifiedImageError

DEFAULT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<payload>.*)", re.DOTALL)


class ImageInputError(ValueError):
    """The request's image is unusable; the message is safe to show the client."""


@dataclass
class ImagePolicy:
    max_bytes: int = 8 * 1024 * 1024          # encoded size of one image
    max_pixels: int = 4096 * 4096              # width * height, checked from the header
    formats: Sequence[str] = DEFAULT_FORMATS   # Pillow format names
    fetcher: RemoteFetcher | None = None     # None: remote URLs are refused


def load_image_url(url: str, policy: ImagePolicy) -> Image.Image:
    """`image_url.url` -> RGB image, or `ImageInputError`."""
    return open_image(image_bytes(url, policy), policy)


def image_size(data: bytes, policy: ImagePolicy) -> tuple[int, int]:
    """(width, height) from the header only, with the same format allowlist and per-image limits as
    `open_image`; nothing is decoded. Lets a request's images be summed before any is decoded."""
    if len(data) > policy.max_bytes:
        raise ImageInputError(f"image is larger than the limit of {policy.max_bytes} bytes")
    formats = [f.upper() for f in policy.formats]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=formats) as image:
                width, height = image.size
    except UnidentifiedImageError:
        raise ImageInputError(f"not an image in an allowed format ({', '.join(formats)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(f"image is over the limit of {policy.max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageInputError(f"cannot decode image: {type(err).__name__}") from None
    if width * height > policy.max_pixels:
        raise ImageInputError(f"image is {width}x{height} px, over the limit of {policy.max_pixels} pixels")
    return width, height


def image_bytes(url: str, policy: ImagePolicy) -> bytes:
    """`image_url.url` -> the encoded image bytes (data: URL decoded, or fetched), or `ImageInputError`."""
    if url.startswith("data:"):
        data = decode_data_url(url, policy.max_bytes)
    elif re.match(r"https?://", url, re.IGNORECASE):
        if policy.fetcher is None:
            raise ImageInputError("remote image URLs are disabled on this server; send the image as a "
                                  "base64 data: URL")
        data = policy.fetcher.fetch(url)
    else:
        raise ImageInputError("image_url must be a base64 data: URL (file paths and file:// URLs are not read)")
    return data


def decode_data_url(url: str, max_bytes: int) -> bytes:
    match = _DATA_URL.fullmatch(url)
    if not match:
        raise ImageInputError("malformed data: URL")
    params = [p.strip().lower() for p in match["params"].split(";") if p.strip()]
    if "base64" not in params:
        raise ImageInputError("data: URL must be base64-encoded (data:image/png;base64,...)")
    mime = match["mime"].strip().lower()
    if mime and not mime.startswith("image/"):
        raise ImageInputError(f"data: URL media type {mime!r} is not an image type")
    payload = match["payload"]
    # Cap before decoding: base64 is 4 characters per 3 bytes.
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise ImageInputError(f"image is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)  # strict: no stray characters
    except (binascii.Error, ValueError):
        raise ImageInputError("invalid base64 in data: URL") from None
    if not data:
        raise ImageInputError("empty image in data: URL")
    return data


def open_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise ImageInputError(f"image is larger than the limit of {policy.max_bytes} bytes")
    formats = [f.upper() for f in policy.formats]
    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)  # header only, allowlisted decoders
            width, height = image.size
            if width * height > policy.max_pixels:
                raise ImageInputError(f"image is {width}x{height} px, over the limit of {policy.max_pixels} pixels")
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animations: the first frame only
            image.load()
            return image.convert("RGB")
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(f"not an image in an allowed format ({', '.join(formats)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(f"image is over the limit of {policy.max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated / corrupt data
        raise ImageInputError(f"cannot decode image: {type(err).__name__}") from None


# -- remote fetching (off by default) ------------------------------------------------------------

def address_is_public(address: str) -> bool:
    """False for private, loopback, link-local, reserved, shared, multicast and unspecified ranges."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass
class RemoteFetcher:
    """http(s) GET with an allowlist, per-hop address checks, a byte cap and an overall timeout.

    `allowed_hosts` entries are exact names or `*.example.com` (subdomains only). `resolve` and
    `address_ok` are injectable so tests can simulate DNS without touching the network.
    """

    allowed_hosts: Sequence[str]
    max_bytes: int = 8 * 1024 * 1024
    timeout: float = 5.0
    max_redirects: int = 3
    resolve: Callable[[str, int], list[str]] = field(default=_resolve)
    address_ok: Callable[[str], bool] = field(default=address_is_public)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.allowed_hosts:
            pattern = pattern.lower().rstrip(".")
            if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
                return True
        return False

    def fetch(self, url: str) -> bytes:
        import httpx  # only needed when remote fetching is enabled

        deadline = time.monotonic() + self.timeout
        with httpx.Client(follow_redirects=False, trust_env=False, timeout=self.timeout) as client:
            for _ in range(self.max_redirects + 1):
                request_url, headers, extensions = self._pin(httpx.URL(url))
                try:
                    with client.stream("GET", request_url, headers=headers, extensions=extensions) as response:
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        if response.status_code != 200:
                            raise ImageInputError(f"fetching the image failed with HTTP {response.status_code}")
                        return self._read_capped(response, deadline)
                except httpx.HTTPError as err:
                    raise ImageInputError(f"fetching the image failed: {type(err).__name__}") from None
        raise ImageInputError(f"too many redirects (more than {self.max_redirects})")

    def _pin(self, url):
        """Check one hop and return a request that connects to the checked address only."""
        if url.scheme not in ("http", "https"):
            raise ImageInputError(f"image URL scheme {url.scheme!r} is not allowed")
        host = url.host
        if not host or not self.host_allowed(host):
            raise ImageInputError(f"image host {host!r} is not in the allowlist")
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = self.resolve(host, port)
        except OSError:
            raise ImageInputError(f"cannot resolve image host {host!r}") from None
        if not addresses or not all(self.address_ok(a) for a in addresses):
            raise ImageInputError(f"image host {host!r} resolves to a private or reserved address")
        address = addresses[0]
        literal = f"[{address}]" if ":" in address else address
        headers = {"Host": host if url.port is None else f"{host}:{url.port}"}
        # TLS still verifies the certificate against the real host name (SNI).
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        return url.copy_with(host=literal.strip("[]")), headers, extensions

    def _read_capped(self, response, deadline: float) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageInputError(f"remote image is larger than the limit of {self.max_bytes} bytes")
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise ImageInputError(f"remote image is larger than the limit of {self.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise ImageInputError("fetching the image timed out")
            chunks.append(chunk)
        return b"".join(chunks)
