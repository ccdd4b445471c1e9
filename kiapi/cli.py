"""``kiapi`` command line: ``serve``, ``doctor`` and the ``handlers check|scaffold`` drift tool."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kiapi.specs import SPECS_DIR


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kiapi.app import create_app
    from kiapi.config import Settings

    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.token and not is_loopback(args.host):
        logging.getLogger("kiapi").warning(
            "serving on %s without KIAPI_AUTH_TOKEN: anyone who can reach this address can use "
            "every endpoint (see SECURITY.md)",
            args.host,
        )
    app = create_app(settings)
    # lifespan="on": a missing handler or a failing start-up stops the server instead of
    # surfacing at the first request.
    uvicorn.run(app, host=args.host, port=args.port, lifespan="on", log_level=settings.log_level)
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
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)

    doctor = sub.add_parser(
        "doctor", help="check the platform, MLX, the BLAS, the files root and the models"
    )
    doctor.set_defaults(func=_doctor)

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
