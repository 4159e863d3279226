"""`laas`: the command-line client (generate, chat, embed, models, model, load, unload, tokenize, health, discover;
export and eval when the exporters are installed: they plug in through laas.client.plugins).

Tokens print as they arrive. Exit codes: 0 ok, 1 the daemon refused the request (the status and the
field are printed), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from laas.client import discover_cli, discovery, plugins
from laas.client.api import Client
from laas.client.channels import Tls
from laas.client.types import Chunk, ModelDescription
from laas.core.addresses import DEFAULT_LISTEN
from laas.core.errors import LaasError


def _parser(found: list[plugins.Plugin | str]) -> tuple[argparse.ArgumentParser, plugins.Plugins]:
    broken = "".join(f"\n  {b}" for b in found if isinstance(b, str))
    epilog = f"commands that failed to load ({plugins.GROUP}):{broken}" if broken else None
    parser = argparse.ArgumentParser(prog="laas", description="client of the laas daemon (laasd)", epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=os.environ.get("LAAS_TARGET", DEFAULT_LISTEN),
                        help=f"daemon address host:port, or mdns:NAME (a daemon on the LAN), or mdns: (the "
                        f"least-loaded one serving --model) (default {DEFAULT_LISTEN}; env LAAS_TARGET)")
    parser.add_argument("--timeout", type=float, help="deadline of each call, seconds")
    parser.add_argument("--token", default=os.environ.get("LAAS_TOKEN"),
                        help="API token, sent as `authorization: Bearer` (env LAAS_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    parser.add_argument("--ca", help="TLS: the CA certificate (PEM) that signed the daemon's certificate")
    parser.add_argument("--cert", help="mutual TLS: this client's certificate (PEM)")
    parser.add_argument("--key", help="mutual TLS: this client's private key (PEM)")
    sub = parser.add_subparsers(dest="command", required=True)

    def sampling(p: argparse.ArgumentParser) -> None:
        p.add_argument("-m", "--model", default="", help="model name (default: the daemon's default)")
        p.add_argument("-n", "--max-tokens", type=int)
        p.add_argument("-t", "--temperature", type=float)
        p.add_argument("--top-p", type=float)
        p.add_argument("--top-k", type=int)
        p.add_argument("--min-p", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        p.add_argument("--repeat-penalty", type=float)
        p.add_argument("--policy", choices=("auto", "local_only", "cloud_only", "prefer_local"),
                       help="where the request may run (default auto)")
        p.add_argument("--budget-ms", dest="latency_budget_ms", type=float,
                       help="latency budget of the whole answer, ms (default: the --timeout deadline)")
        p.add_argument("--keep-alive", dest="keep_alive_s", type=float,
                       help="seconds the model stays loaded after this request (<0 forever, 0 unload when done)")
        p.add_argument("--stats", action="store_true",
                       help="print the route, usage and timings to stderr at the end")

    gen = sub.add_parser("generate", help="complete a prompt, streaming")
    gen.add_argument("prompt", help="the prompt ('-' reads standard input)")
    sampling(gen)
    chat = sub.add_parser("chat", help="chat with the model's chat template (interactive without a message)")
    chat.add_argument("message", nargs="?", help="one user message; omit for an interactive session")
    chat.add_argument("--system", help="a system message")
    sampling(chat)
    explain = sub.add_parser("explain", help="where would this prompt go, and why (nothing is generated)")
    explain.add_argument("prompt")
    sampling(explain)
    sub.add_parser("models", help="list the daemon's models")
    model = sub.add_parser("model", help="describe one model (JSON)")
    model.add_argument("name", nargs="?", default="")
    emb = sub.add_parser("embed", help="embed texts with an embedding model (a JSON line per text)")
    emb.add_argument("texts", nargs="+", help="the texts ('-' reads one text a line from standard input)")
    emb.add_argument("-m", "--model", default="")
    emb.add_argument("--dimensions", type=int, help="cut vectors to this size (Matryoshka models only)")
    emb.add_argument("--no-normalize", dest="normalize", action="store_false", default=None,
                     help="raw pooled vectors, not unit length")
    emb.add_argument("--truncate", action="store_true", help="cut texts longer than the model's window")
    emb.add_argument("--policy", choices=("auto", "local_only", "cloud_only", "prefer_local"))
    tok = sub.add_parser("tokenize", help="print the token ids of a text")
    tok.add_argument("text")
    tok.add_argument("-m", "--model", default="")
    load = sub.add_parser("load", help="load a model now (needs the models:admin scope)")
    load.add_argument("name", nargs="?", default="", help="model name (default: the daemon's default)")
    load.add_argument("--keep-alive", dest="keep_alive_s", type=float,
                      help="seconds it stays loaded once idle (<0 forever; default: its configured keep_alive_s)")
    unload = sub.add_parser("unload", help="unload a model (when its streams end; needs the models:admin scope)")
    unload.add_argument("name", nargs="?", default="", help="model name (default: the daemon's default)")
    sub.add_parser("health", help="print the daemon's health (exit 1 unless SERVING)")
    discover_cli.add_parser(sub)
    mounted = plugins.mount(sub, found)  # export, eval: run in process, not against the daemon
    return parser, mounted


_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "repeat_penalty",
                  "policy", "latency_budget_ms", "keep_alive_s")


def _print_stream(chunks: Iterator[Chunk], stats: bool) -> str:
    parts = []
    last = None
    routes = []
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        parts.append(chunk.text)
        if chunk.route is not None:
            routes.append(chunk.route)
        last = chunk
    sys.stdout.write("\n")
    if stats and last is not None:
        for r in routes:
            print(f"[route: {r.kind} {r.target}{' (failover)' if r.failover else ''}: {r.reason}; "
                  f"predicted {r.predicted_ms:.0f} ms]", file=sys.stderr)
        t = last.timings
        print(f"[{last.finish_reason}; {last.prompt_tokens} prompt + {last.completion_tokens} tokens; "
              f"first token {t.get('time_to_first_token_ms', 0):.0f} ms; "
              f"{t.get('decode_tokens_per_second', 0):.1f} tok/s]", file=sys.stderr)
    return "".join(parts)


def _residency(m: ModelDescription) -> str:
    """When a loaded model unloads: "(unloads in 4m59s)", "(kept loaded)", "(unloads when idle)"."""
    if m.state != "ready":
        return ""
    if m.keep_alive_s < 0:
        return " (kept loaded)"
    if m.unloads_in_s:
        minutes, seconds = divmod(round(m.unloads_in_s), 60)
        return f" (unloads in {minutes}m{seconds:02d}s)" if minutes else f" (unloads in {seconds}s)"
    return " (busy; unloads when idle)" if m.keep_alive_s == 0 else " (busy)"


def _run(args: argparse.Namespace, client: Client) -> int:
    sampling: dict[str, Any] = {k: getattr(args, k) for k in _SAMPLING_KEYS if getattr(args, k, None) is not None}
    if args.command == "generate":
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        _print_stream(client.generate(prompt, model=args.model, timeout=args.timeout, **sampling), args.stats)
    elif args.command == "chat":
        history = [{"role": "system", "content": args.system}] if args.system else []
        interactive = args.message is None
        while True:
            if interactive:
                try:
                    line = input(">>> ")
                except EOFError:
                    return 0
                if not line.strip():
                    continue
            history.append({"role": "user", "content": line if interactive else args.message})
            reply = _print_stream(client.chat(history, model=args.model, timeout=args.timeout, **sampling),
                                  args.stats)
            history.append({"role": "assistant", "content": reply})
            if not interactive:
                return 0
    elif args.command == "explain":
        e = client.explain(args.prompt, model=args.model, timeout=args.timeout, **sampling)
        print(f"route: {e.chosen.kind} {e.chosen.target}: {e.chosen.reason}")
        print(f"{e.prompt_tokens} prompt tokens, {e.max_tokens} max tokens, budget "
              f"{f'{e.budget_ms:.0f} ms' if e.budget_ms else 'none'}; order: {' -> '.join(e.order)}")
        for c in e.candidates:
            verdict = "eligible" if c.eligible else "not eligible"
            print(f"  {c.kind:5} {c.target:28} {c.predicted_ms:9.0f} ms  {verdict}{': ' + c.note if c.note else ''}")
    elif args.command == "models":
        print(f"{'NAME':32} {'FORMAT':6} {'QUANT':8} {'CONTEXT':>7} {'PARALLEL':>8} {'SIZE':>9} {'MEMORY':>9}  STATE")
        for m in client.models(timeout=args.timeout):
            star = "*" if m.is_default else " "
            memory = f"{m.memory_bytes / 1e6:>7.1f}MB" if m.memory_bytes else f"{'-':>9}"
            print(f"{m.name + star:32} {m.format:6} {m.quantization:8} {m.context_length:>7} {m.parallel:>8} "
                  f"{m.size_bytes / 1e6:>7.1f}MB {memory}  {m.state}{_residency(m)}{' ' + m.error if m.error else ''}")
    elif args.command in ("load", "unload"):
        m = (client.load_model(args.name, keep_alive_s=args.keep_alive_s, timeout=args.timeout)
             if args.command == "load" else client.unload_model(args.name, timeout=args.timeout))
        print(f"{m.name}: {m.state}{_residency(m)}")
    elif args.command == "model":
        m = client.model(args.name, timeout=args.timeout)
        print(json.dumps({k: getattr(m, k) for k in m.__dataclass_fields__}, indent=2))
    elif args.command == "embed":
        texts = [t for line in sys.stdin for t in [line.rstrip("\n")] if t] if args.texts == ["-"] else args.texts
        out = client.embed(texts, model=args.model, dimensions=args.dimensions, normalize=args.normalize,
                           truncate=args.truncate, policy=args.policy, timeout=args.timeout)
        route = out.route.target if out.route else ""
        for i, vector in enumerate(out.vectors):
            print(json.dumps({"index": i, "model": out.model, "route": route, "tokens": out.tokens[i],
                              "truncated": out.truncated[i], "embedding": vector}))
    elif args.command == "tokenize":
        tokens = client.tokenize(args.text, model=args.model, timeout=args.timeout)
        print(json.dumps({"count": len(tokens), "tokens": tokens}))
    elif args.command == "health":
        status = client.health(timeout=args.timeout or 5.0)
        print(status)
        return 0 if status == "SERVING" else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, mounted = _parser(plugins.load())
    args = parser.parse_args(argv)
    if args.command in mounted.by_command:
        return mounted.by_command[args.command].run(args)
    if args.command in plugins.OPTIONAL:
        print(f"laas: {mounted.missing(args.command)}", file=sys.stderr)
        return 2
    try:
        if args.command == "discover":
            return discover_cli.run(args)
        if args.target.startswith("mdns:"):  # found on the LAN by name, or the least-loaded for the model
            name = args.target.removeprefix("mdns:")
            args.target = (discovery.find(name) if name else discovery.least_loaded(getattr(args, "model", ""))).target
        tls = Tls(args.ca, args.cert, args.key) if args.tls or args.ca or args.cert else None
        with Client(args.target, tls=tls, token=args.token or None) as client:
            return _run(args, client)
    except LaasError as e:
        where = f" (field: {e.field})" if e.field else ""
        print(f"laas: {e.code.name}: {e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
