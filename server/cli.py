"""``lookm-serve`` (also ``python -m lookm_vllm.server``): vLLM's OpenAI server, LOOK-M enabled.

The command line is vLLM's own (``make_arg_parser``: every engine and server flag passes through)
plus LOOK-M's group (``--kv-compression``, the media policy, the request-size limit). The vLLM
arguments are parsed in two layers, the user's over lookm-serve's own:

    lookm-serve's:  [demo-model settings] [--allowed-media-domains ...] [--limit-mm-per-prompt ...]
                    [--attention-backend FLASH_ATTN on CUDA, unless the user chose a backend]
                    options.engine_cli_args(<--kv-compression>)   # the engine option, ONE place
                    --middleware lookm_vllm.server.middleware.LookMMiddleware  # checks, usage
    the user's:     everything on the command line (wins; --middleware appends)

which vLLM's own ``run_server`` (uvicorn) serves. Without ``--model`` the demo model shipped in the
package is served (``lookm_vllm.demo.trained``: a small LLaVA trained on colored-shape questions,
see ``lookm_vllm.demo.shapes``; nothing is trained or built at start) and, on CPU, with the
tiny-model engine settings of ``lookm_vllm.demo.tiny_models.vllm_server_args``; flags given
explicitly win over those.
Environment fallbacks (for Docker / k8s; a flag wins over its variable): ``ENV_FALLBACKS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from pydantic import ValidationError

from lookm_vllm.core import CompressionConfig
from lookm_vllm.vllm_adapter import options

from .retry import DEFAULT_RETRIES
from .validation import describe_errors

MIDDLEWARE = "lookm_vllm.server.middleware.LookMMiddleware"
# Images per request when serving the demo model without --max-images.
DEMO_MAX_IMAGES = 8
# Environment variable -> argument it provides the default of.
ENV_FALLBACKS = {
    "LOOKM_MODEL": "model",
    "LOOKM_KV_COMPRESSION": "kv_compression",
    "LOOKM_API_KEY": "api_key",
    "LOOKM_HOST": "host",
    "LOOKM_PORT": "port",
}


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


_non_negative_int.__name__ = "int"


def _domains(text: str) -> list[str]:
    return [d.strip().lower() for d in text.split(",") if d.strip()]


def make_parser():
    """vLLM's server argument parser with LOOK-M's flags and the environment fallbacks."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(
        prog="lookm-serve",
        description="OpenAI-compatible vLLM server with LOOK-M multimodal KV-cache compression. "
                    "All vLLM engine and server arguments are accepted."))
    group = parser.add_argument_group(
        "LOOK-M", "LOOK-M KV-cache compression and request checks (lookm-serve --help=LOOK-M).")
    group.add_argument(
        "--kv-compression", metavar="JSON", default=None,
        help="Server-wide compression config for requests that carry none, a JSON object of "
             "CompressionConfig fields, e.g. '{\"method\":\"lookm\",\"budget\":0.2}'. Without "
             "it, only requests with their own kv_compression are compressed. "
             "Env: LOOKM_KV_COMPRESSION.")
    group.add_argument(
        "--allow-remote-images", action="store_true",
        help="Accept http(s) image/media URLs (the server fetches them). Refused by default: "
             "send images inline as base64 data URLs.")
    group.add_argument(
        "--allowed-image-domains", metavar="DOMAINS", type=_domains, default=None,
        help="Comma-separated host names remote media URLs may name (exact match, e.g. "
             "'a.com,b.org'); implies --allow-remote-images for these hosts only. Also passed "
             "to vLLM as --allowed-media-domains.")
    group.add_argument(
        "--max-images", metavar="N", type=_positive(int), default=None,
        help="Most images per request (HTTP 400 beyond). Sets vLLM's --limit-mm-per-prompt "
             "image count unless that is given. Without it: that count, if any (8 for the "
             "demo model).")
    group.add_argument(
        "--max-request-mb", metavar="MB", type=_positive(float), default=32.0,
        help="Largest request body accepted, in MiB (HTTP 400 beyond).")
    group.add_argument(
        "--mm-cache-retries", metavar="N", type=_non_negative_int, default=DEFAULT_RETRIES,
        help="Times a chat completion is rendered and sent to the engine again when vLLM's "
             "multimodal processor cache misses its images (P0/P1 cache drift, a race under "
             "concurrent load) before the client gets HTTP 503 with Retry-After. 0: no retry.")
    for action in parser._actions:
        if "--model" in action.option_strings:
            action.help = ("Model directory or Hugging Face id. Default: the demo model "
                           "shipped in the package (a small LLaVA trained to answer questions "
                           "about colored shapes, lookm_vllm/demo/shapes_llava). "
                           "Env: LOOKM_MODEL.")
    defaults: dict[str, Any] = {"model": None}
    for var, dest in ENV_FALLBACKS.items():
        value = os.environ.get(var)
        if value:
            defaults[dest] = value
    if "api_key" in defaults:
        defaults["api_key"] = [defaults["api_key"]]
    if "port" in defaults:
        try:
            defaults["port"] = int(defaults["port"])
        except ValueError:
            fail(parser, f"LOOKM_PORT must be a port number, got {defaults['port']!r}")
    parser.set_defaults(**defaults)
    return parser


def fail(parser, message: str) -> NoReturn:
    """Exit with status 2 and one line (``parser.error`` would print vLLM's whole usage)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def server_default(parser, text: str | None) -> CompressionConfig | None:
    """The validated ``--kv-compression`` (exits naming the offending field if invalid)."""
    if text is None:
        return None
    try:
        return CompressionConfig.model_validate_json(text)
    except ValidationError as exc:
        _, details = describe_errors(exc, "kv_compression")
        fail(parser, f"invalid --kv-compression (or LOOKM_KV_COMPRESSION) {text!r}: {details}")


def _demo_model_args(max_images: int | None) -> list[str]:
    from vllm.platforms import current_platform

    from lookm_vllm.demo.tiny_models import vllm_server_args
    from lookm_vllm.demo.trained import demo_model_path

    path = demo_model_path()
    if current_platform.is_cpu():
        return vllm_server_args(path, max_images=max_images or DEMO_MAX_IMAGES)
    return ["--model", str(path)]


def _serves_on_cuda() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The complete vLLM server arguments of ``lookm-serve argv``."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    given = parser.parse_args(argv)
    default = server_default(parser, given.kv_compression)
    if given.kv_transfer_config is not None:
        fail(parser, "lookm-serve sets --kv-transfer-config itself (LOOK-M's connector); "
                     "set the server-wide compression with --kv-compression")
    # Settings lookm-serve chooses: the user's own flags (parsed last) win over them.
    ours: list[str] = []
    if given.model is None and given.model_tag is None:
        ours = _demo_model_args(given.max_images)
    elif given.model is None:
        ours = ["--model", given.model_tag]
    if given.allowed_image_domains:
        domains = sorted(set(given.allowed_media_domains or ()) | set(given.allowed_image_domains))
        ours += ["--allowed-media-domains", *domains]
    # LOOK-M wraps FLASH_ATTN on CUDA; vLLM would pick FlashInfer on some GPUs (e.g. SM100) and
    # the engine would be refused. A backend the user chose (flag or attention config) wins.
    if (_serves_on_cuda() and given.attention_backend is None
            and getattr(given.attention_config, "backend", None) is None):
        ours += ["--attention-backend", "FLASH_ATTN"]
    if (given.max_images is not None and not given.limit_mm_per_prompt
            and "--limit-mm-per-prompt" not in ours):
        ours += ["--limit-mm-per-prompt", json.dumps({"image": given.max_images})]
    # Settings that are not the user's to change (--kv-transfer-config is refused above;
    # --middleware appends to the user's own).
    ours += options.engine_cli_args(default) + ["--middleware", MIDDLEWARE]
    args = parser.parse_args(argv, namespace=parser.parse_args(ours))
    if args.max_images is None:
        args.max_images = (args.limit_mm_per_prompt or {}).get("image")
    validate_parsed_serve_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    # Before anything of vLLM runs: its engine processes inherit this environment.
    os.environ.update(options.ENGINE_ENV)
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    args = parse_args(argv)
    configure_logging_from_args(args)
    uvloop.run(run_server(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
