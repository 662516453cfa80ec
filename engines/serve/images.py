"""`image_url` parts to PIL images: `data:` URLs with base64, or http(s) URLs fetched with a byte
limit and a timeout. Everything a client can get wrong is an `APIError` 400."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image

from engines.serve.protocol import APIError


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    fetch_timeout_s: float = 10.0
    allow_fetch: bool = True


async def load_image_url(url: str, limits: ImageLimits, param: str = "image_url") -> Image.Image:
    if url.startswith("data:"):
        data = decode_data_url(url, limits, param)
    elif url.startswith(("http://", "https://")):
        if not limits.allow_fetch:
            raise APIError(400, f"{param}: this server does not fetch image URLs; send a data: URL", param=param)
        data = await fetch(url, limits, param)
    else:
        raise APIError(400, f"{param}: expected a data: URL (base64) or an http(s) URL", param=param)
    return decode_image(data, limits, param)


def decode_data_url(url: str, limits: ImageLimits, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"{param}: a data: URL must be 'data:<mime>;base64,<data>'", param=param)
    if len(payload) * 3 // 4 > limits.max_bytes + 3:
        raise APIError(400, f"{param}: the image is larger than this server's limit of {limits.max_bytes} bytes",
                       param=param, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data: URL's base64 is invalid", param=param) from None


async def fetch(url: str, limits: ImageLimits, param: str) -> bytes:
    import httpx

    too_large = APIError(400, f"{param}: the image at the URL is larger than this server's limit of "
                              f"{limits.max_bytes} bytes", param=param, code="image_too_large")
    try:
        async with httpx.AsyncClient(timeout=limits.fetch_timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise APIError(400, f"{param}: fetching the image gave HTTP {response.status_code}", param=param)
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise too_large
                data = bytearray()
                async for piece in response.aiter_bytes():
                    data += piece
                    if len(data) > limits.max_bytes:
                        raise too_large
                return bytes(data)
    except httpx.TimeoutException:
        raise APIError(400, f"{param}: fetching the image timed out after {limits.fetch_timeout_s} s",
                       param=param) from None
    except httpx.HTTPError as exc:
        raise APIError(400, f"{param}: cannot fetch the image: {type(exc).__name__}", param=param) from None


def decode_image(data: bytes, limits: ImageLimits, param: str) -> Image.Image:
    if len(data) > limits.max_bytes:
        raise APIError(400, f"{param}: the image is larger than this server's limit of {limits.max_bytes} bytes",
                       param=param, code="image_too_large")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # read from the header, before decoding any pixels
    except Exception:  # noqa: BLE001 - PIL raises several types for what is not an image
        raise APIError(400, f"{param}: the bytes are not an image PIL can read", param=param,
                       code="invalid_image") from None
    if width * height > limits.max_pixels:
        raise APIError(400, f"{param}: the image has {width}x{height} pixels, over this server's limit of "
                            f"{limits.max_pixels}", param=param, code="image_too_large")
    try:
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file
        raise APIError(400, f"{param}: the image cannot be decoded ({type(exc).__name__})", param=param,
                       code="invalid_image") from None
