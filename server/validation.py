"""Admission checks of requests, in the API process, before vLLM sees them.

``check_media`` applies the server's media policy to any request body: image data URLs must
decode, remote URLs only when allowed, local files never unless vLLM's
``--allowed-local-media-path`` names their directory, at most ``max_images`` images.
``prepare_chat_request`` also validates what LOOK-M adds to a chat completion (a top-level
``kv_compression`` object, or ``vllm_xargs["kv_compression"]`` as a JSON string) and rewrites it
into the form vLLM takes: ``vllm_xargs={"kv_compression": "<json>"}``. Every refusal is a
``RequestError`` naming the offending field as an OpenAI ``param`` path
(``kv_compression.budget``, ``messages[0].content[1].image_url``). Everything else about a
request (its OpenAI schema, the model, sampling parameters) is left to vLLM."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError

from lookm_vllm.core import CompressionConfig
from lookm_vllm.vllm_adapter.options import EXTRA_ARGS_KEY

# Content types accepted in image data URLs, with the PIL format each must decode as.
IMAGE_MEDIA_TYPES: dict[str, str] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
}
# Content-part types that put one image into the prompt (vLLM's MM_PARSER_MAP names); a part
# without "type" but with one of the keys below is an image too, as vLLM reads it.
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image_pil", "image_embeds"})
_UNTYPED_IMAGE_KEYS = ("image_url", "image_pil", "image_embeds")
# Keys whose value is a media URL (a string, or {"url": ...}).
_URL_KEYS = ("image_url", "video_url", "audio_url")
_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)


class RequestError(ValueError):
    """A request the server refuses: HTTP 400 with ``message`` and ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class RequestPolicy:
    """What a request may contain, from the server's command line.

    Parameters
    ----------
    allow_remote_images : bool
        Whether http(s) media URLs are accepted at all.
    allowed_image_domains : frozenset of str
        When not empty, the only host names remote URLs may name (exact, case-insensitive match,
        as vLLM's ``--allowed-media-domains``).
    allowed_local_media_path : str
        vLLM's ``--allowed-local-media-path``: ``file://`` URLs are refused unless they lie in this
        directory; empty (the default) refuses them all.
    max_images : int, optional
        Most images one request may carry; ``None``: no limit of the server's own.
    max_request_bytes : int
        Largest request body accepted.
    """

    allow_remote_images: bool = False
    allowed_image_domains: frozenset[str] = frozenset()
    allowed_local_media_path: str = ""
    max_images: int | None = None
    max_request_bytes: int = 32 << 20

    @classmethod
    def from_args(cls, args: Any) -> RequestPolicy:
        """The policy of a server started with ``args`` (lookm-serve's, or a stock vLLM server's
        namespace, which has none of lookm-serve's flags and gets the defaults)."""
        domains = frozenset(d.lower() for d in getattr(args, "allowed_media_domains", None) or ())
        max_mb = getattr(args, "max_request_mb", None)
        return cls(
            allow_remote_images=bool(getattr(args, "allow_remote_images", False) or domains),
            allowed_image_domains=domains,
            allowed_local_media_path=getattr(args, "allowed_local_media_path", "") or "",
            max_images=getattr(args, "max_images", None),
            max_request_bytes=cls.max_request_bytes if max_mb is None else int(max_mb * (1 << 20)),
        )


def param_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    """An OpenAI ``param`` path: ``("messages", 0, "content")`` -> ``messages[0].content``."""
    path = prefix
    for item in loc:
        path += f"[{item}]" if isinstance(item, int) else (f".{item}" if path else str(item))
    return path


def describe_errors(exc: ValidationError, prefix: str) -> tuple[str, str]:
    """A pydantic error as (the first error's ``param`` path, one line naming every error)."""
    errors = exc.errors(include_url=False)
    details = "; ".join(
        (f"{param_path(prefix, tuple(e['loc']))}: " if e["loc"] else "")
        + e["msg"].removeprefix("Value error, ")
        for e in errors
    )
    return param_path(prefix, tuple(errors[0]["loc"])), details


def _config_error(exc: ValidationError, param: str) -> RequestError:
    where, details = describe_errors(exc, param)
    return RequestError(f"invalid {param}: {details}", where)


def compression_config(body: dict[str, Any]) -> CompressionConfig | None:
    """The request's own compression config (top-level ``kv_compression`` object, or the JSON
    string in ``vllm_xargs["kv_compression"]``), validated; ``None`` when it has none."""
    top = body.get(EXTRA_ARGS_KEY)
    xargs = body.get("vllm_xargs")
    in_xargs = xargs.get(EXTRA_ARGS_KEY) if isinstance(xargs, dict) else None
    if top is not None and in_xargs is not None:
        raise RequestError(f"give {EXTRA_ARGS_KEY} either as a top-level object or in "
                           f"vllm_xargs, not both", EXTRA_ARGS_KEY)
    if top is not None:
        if not isinstance(top, dict):
            raise RequestError(f"{EXTRA_ARGS_KEY} must be a JSON object of compression "
                               f"settings, not {type(top).__name__}", EXTRA_ARGS_KEY)
        try:
            return CompressionConfig.model_validate(top)
        except ValidationError as exc:
            raise _config_error(exc, EXTRA_ARGS_KEY) from None
    if in_xargs is not None:
        param = f"vllm_xargs.{EXTRA_ARGS_KEY}"
        if not isinstance(in_xargs, str):
            # vLLM's vllm_xargs values are strings or numbers: a nested config travels as JSON.
            raise RequestError(f"{param} must be a JSON string (or send a top-level "
                               f"{EXTRA_ARGS_KEY} object)", param)
        try:
            return CompressionConfig.model_validate_json(in_xargs)
        except ValidationError as exc:
            raise _config_error(exc, param) from None
    return None


# Digests of image data URLs that passed _check_data_image: a chat re-sends its images every
# turn, and a full decode of each (~1 ms per photo on one core) would be repeated per turn.
# Only successes are remembered; the checks run in worker threads, hence the lock.
VALIDATED_IMAGES_MAX = 4096
_validated_images: OrderedDict[bytes, None] = OrderedDict()
_validated_lock = threading.Lock()


def _check_data_image(url: str, param: str) -> None:
    key = hashlib.blake2b(url.encode(), digest_size=16).digest()
    with _validated_lock:
        if key in _validated_images:
            _validated_images.move_to_end(key)
            return
    _decode_data_image(url, param)
    with _validated_lock:
        _validated_images[key] = None
        while len(_validated_images) > VALIDATED_IMAGES_MAX:
            _validated_images.popitem(last=False)


def _decode_data_image(url: str, param: str) -> None:
    """Raise ``RequestError`` unless ``url`` is a base64 data URL of an image that decodes."""
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise RequestError("malformed data URL", param)
    media_type = match["type"].lower()
    if media_type not in IMAGE_MEDIA_TYPES:
        raise RequestError(f"unsupported image type {media_type or '(none)'!r}; accepted: "
                           f"{', '.join(sorted(IMAGE_MEDIA_TYPES))}", param)
    if "base64" not in (p.strip().lower() for p in match["params"].split(";")):
        raise RequestError("image data URLs must be base64-encoded (data:image/png;base64,...)",
                           param)
    try:
        raw = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image data URL is not valid base64", param) from None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            fmt = img.format
            img.load()
    except Image.DecompressionBombError as exc:
        raise RequestError(f"image too large: {exc}", param) from None
    # Any decoder failure is the client's image, never a server error: PIL raises many types
    # (UnidentifiedImageError, OSError, SyntaxError, struct.error, ...).
    except Exception:
        raise RequestError(f"image data does not decode as {media_type}", param) from None
    if fmt not in set(IMAGE_MEDIA_TYPES.values()):
        raise RequestError(f"unsupported image format {fmt}", param)


def _check_url(url: str, param: str, policy: RequestPolicy, *, image: bool) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme == "data":
        if image:
            _check_data_image(url, param)
        return
    if scheme in ("http", "https"):
        if not policy.allow_remote_images:
            raise RequestError("remote media URLs are not allowed on this server: send the image "
                               "inline as a base64 data URL", param)
        host = (urlsplit(url).hostname or "").lower()
        if policy.allowed_image_domains and host not in policy.allowed_image_domains:
            raise RequestError(f"media domain {host!r} is not allowed on this server", param)
        return
    if scheme == "file":
        root = policy.allowed_local_media_path and os.path.realpath(
            policy.allowed_local_media_path)
        path = os.path.realpath(unquote(urlsplit(url).path))
        if not root or os.path.commonpath([path, root]) != root:
            raise RequestError("local file URLs are not allowed on this server", param)
        return
    raise RequestError(f"unsupported media URL scheme {scheme!r}", param)


def _is_image_part(part: dict[str, Any]) -> bool:
    kind = part.get("type")
    if kind is None:
        return any(key in part for key in _UNTYPED_IMAGE_KEYS)
    return kind in IMAGE_PART_TYPES


def _media_parts(body: Any):
    """Every dict in a JSON document with its ``param`` path, in document order (iterative: a
    deeply nested body cannot exhaust the stack)."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            yield path, node
            children = [(param_path(path, (key,)), value) for key, value in node.items()]
        elif isinstance(node, list):
            children = [(param_path(path, (i,)), item) for i, item in enumerate(node)]
        else:
            continue
        stack.extend(reversed(children))


def check_media(body: Any, policy: RequestPolicy) -> None:
    """Apply the media policy to every media URL and image part of a request body.

    Walks the whole body, not only ``messages[*].content``, so every vLLM endpoint taking
    OpenAI-style content parts (chat, batch chat, responses, tokenize, pooling) or URL source
    blocks (Anthropic messages) is covered.
    """
    images = 0
    for path, part in _media_parts(body):
        images += int(_is_image_part(part))
        for key in _URL_KEYS:
            value = part.get(key)
            url = value.get("url") if isinstance(value, dict) else value
            if isinstance(url, str):
                _check_url(url, param_path(path, (key,)), policy, image=key == "image_url")
        if part.get("type") == "url" and isinstance(part.get("url"), str):
            # a URL source block ({"type": "url", "url": ...}, e.g. Anthropic /v1/messages images)
            _check_url(part["url"], param_path(path, ("url",)), policy, image=False)
    if policy.max_images is not None and images > policy.max_images:
        raise RequestError(f"{images} images in one request; this server accepts at most "
                           f"{policy.max_images}", "messages")


def prepare_chat_request(body: Any, policy: RequestPolicy) -> Any:
    """Validate a chat-completion body and return it rewritten for vLLM: the same object when
    there is nothing to rewrite (no ``kv_compression`` field, or not a JSON object: vLLM reports
    that). Raises ``RequestError`` for an invalid compression config or a media-policy violation.
    """
    if not isinstance(body, dict):
        return body
    config = compression_config(body)
    check_media(body, policy)
    if EXTRA_ARGS_KEY not in body:
        return body
    body = dict(body)
    del body[EXTRA_ARGS_KEY]
    if config is not None:
        xargs = body.get("vllm_xargs")
        body["vllm_xargs"] = {**(xargs if isinstance(xargs, dict) else {}),
                              EXTRA_ARGS_KEY: config.model_dump_json()}
    return body
