"""`nimblelm serve`: its flags (each also read from a NIMBLELM_* environment variable), and the run.

The socket is bound before the model loads, so a taken port fails in a second, not after the load;
uvicorn then serves on it. SIGTERM or SIGINT stops accepting, lets in-flight requests finish for up
to --shutdown-timeout seconds, aborts the rest, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from nimblelm.errors import InvalidRequestError, NimbleLMError
from nimblelm.prompting.scorer import SCORER_MODEL

ENV_PREFIX = "NIMBLELM_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def add_serve_subparser(sub, engine_args, engine_fields: list[str]) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        description="Serve a model over the OpenAI API. Every flag can also be set by an environment variable: "
        "--max-model-len by NIMBLELM_MAX_MODEL_LEN, and so on (a flag on the command line wins).",
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    g.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on all but /health, /metrics")
    g.add_argument("--served-model-name", default=None, help="the name clients pass as model (default: --model)")
    g.add_argument("--max-waiting-requests", type=int, default=256,
                   help="requests that may wait beyond the max_num_seqs running; more get 503")
    g.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT before they are aborted")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--prompt-compression-scorer", default=SCORER_MODEL,
                   help="the small model that scores prompts for requests with prompt_compression (loaded on "
                        "the first such request)")
    g = p.add_argument_group("replicas (Ray Serve)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine replicas behind the one endpoint, each with its own model copy and KV cache; more "
                        "than 1 serves through Ray Serve (a local Ray cluster unless RAY_ADDRESS names one)")
    g.add_argument("--ray-serve", action="store_true",
                   help="serve through Ray Serve even with one replica (prefix-aware routing, Ray's metrics)")
    g.add_argument("--min-replicas", type=int, default=None, help="Ray Serve autoscaling: at least this many")
    g.add_argument("--max-replicas", type=int, default=None, help="Ray Serve autoscaling: at most this many")
    g = p.add_argument_group("disaggregated prefill (Ray)")
    g.add_argument("--disaggregated-prefill", action="store_true",
                   help="compute prompts on a prefill instance of their own (a Ray actor; a local Ray cluster unless "
                        "RAY_ADDRESS names one); the server's engine imports their KV blocks and generates")
    g.add_argument("--prefill-threads", type=int, default=None,
                   help="the prefill instance's threads (default: half the physical cores; the server's engine "
                        "takes the rest unless --threads says otherwise)")
    engine_args(p)
    _defaults_from_env(p)
    p.set_defaults(func=lambda args: serve(args, engine_fields))


def _defaults_from_env(parser: argparse.ArgumentParser) -> None:
    """Let NIMBLELM_<FLAG> set each flag's default, so the command line still wins over the environment."""
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or action.dest == "help":
            continue
        name = ENV_PREFIX + longs[0][2:].upper().replace("-", "_")
        action.help = f"{action.help or ''} [env {name}]".strip()
        if name not in os.environ:
            continue
        raw = os.environ[name]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if raw.lower() not in _TRUE | _FALSE:
                parser.error(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")
            value = action.const if raw.lower() in _TRUE else action.default
        else:
            try:
                value = action.type(raw) if action.type else raw
            except ValueError:
                parser.error(f"{name}={raw!r} is not a valid value for {longs[0]}")
            if action.choices is not None and value not in action.choices:
                parser.error(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        action.default = value


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it Nagle's algorithm adds ~40 ms to responses written in two parts.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise NimbleLMError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)  # connections made while the model loads wait here instead of being refused
    return sock


def serve(args, engine_fields: list[str]) -> int:
    for flag, value in (("--max-waiting-requests", args.max_waiting_requests), ("--max-request-bytes",
                        args.max_request_bytes)):
        if value < 0:
            raise InvalidRequestError(f"{flag} must be >= 0, got {value}")
    if args.shutdown_timeout < 0:
        raise InvalidRequestError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    for flag, value in (("--data-parallel-size", args.data_parallel_size), ("--min-replicas", args.min_replicas),
                        ("--max-replicas", args.max_replicas)):
        if value is not None and value < 1:
            raise InvalidRequestError(f"{flag} must be >= 1, got {value}")
    replicas = args.ray_serve or args.data_parallel_size > 1 or args.min_replicas or args.max_replicas
    if args.disaggregated_prefill and replicas:
        raise InvalidRequestError("--disaggregated-prefill serves one engine: it cannot be combined with replicas")
    if args.prefill_threads is not None and (args.prefill_threads < 1 or not args.disaggregated_prefill):
        raise InvalidRequestError("--prefill-threads must be >= 1, with --disaggregated-prefill")
    sock = _bind(args.host, args.port)  # before the heavy imports: a taken port fails at once
    host, port = sock.getsockname()[:2]
    settings = _settings(args, host, port)
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if replicas:
        sock.close()  # Ray Serve's proxy binds it
        return _serve_on_ray(args, engine_fields, settings, url)
    prefill = None
    try:
        import uvicorn

        from nimblelm.llm import LLM
        from nimblelm.server.app import build_app
        from nimblelm.server.async_engine import EngineThread

        options = {k: getattr(args, k) for k in engine_fields}
        where = ""
        if args.disaggregated_prefill:
            prefill, threads, rest = _prefill_instance(args.model, options, args.prefill_threads)
            options["num_threads"] = options["num_threads"] or rest
            where = f"; prompts prefilled by a Ray actor of {threads} thread{'s' if threads > 1 else ''}"
        engine_thread = EngineThread()
        llm = engine_thread.call(lambda: LLM(args.model, **options))
        if prefill is not None:
            import ray

            ray.get(prefill.stats.remote())  # its engine loaded as well: ready for the first request

        def ready() -> None:
            print(f"nimblelm serve: {settings.model_name} on {url}/v1 (ready; {llm.llm_engine.precision}{where})",
                  flush=True)

        app = build_app(llm.llm_engine, settings, on_ready=ready, engine_thread=engine_thread, prefill=prefill)
        config = uvicorn.Config(
            app,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.shutdown_timeout,
            access_log=args.log_level in ("info", "debug"),
        )
        # uvicorn re-raises the stop signal once it has shut down gracefully, which would end the
        # process with the signal's status; with these handlers that re-raise does nothing: exit 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if prefill is not None:
            import ray

            ray.shutdown()
    print("nimblelm serve: stopped", file=sys.stderr, flush=True)
    return 0


def _prefill_instance(model: str, options: dict, threads: int | None):
    """The prefill instance's actor (started now, loading while the server's engine does), its threads, and the
    threads left to the server's engine."""
    from nimblelm.distributed.disaggregated import prefill_instance
    from nimblelm.platform import physical_cores

    cores = physical_cores()
    threads = threads or max(1, cores // 2)
    return prefill_instance(model, options, cpus=threads), threads, max(1, cores - threads)


def _settings(args, host: str, port: int):
    from nimblelm.server.app import ServerSettings

    return ServerSettings(
        model_name=args.served_model_name or args.model,
        host=host,
        port=port,
        api_key=args.api_key or None,
        max_request_bytes=args.max_request_bytes,
        max_waiting_requests=args.max_waiting_requests,
        shutdown_timeout=args.shutdown_timeout,
        prompt_compression_scorer=args.prompt_compression_scorer,
    )


def _serve_on_ray(args, engine_fields: list[str], settings, url: str) -> int:
    """The replicas on Ray Serve (server/ray_serve.py) until SIGTERM or SIGINT."""
    import threading

    import ray
    from ray import serve as ray_serve

    from nimblelm.platform import physical_cores
    from nimblelm.server.ray_serve import build_app

    options = {k: getattr(args, k) for k in engine_fields}
    replicas = args.max_replicas or args.data_parallel_size
    # One machine's cores shared out between the replicas that may run on it at once.
    options["num_threads"] = options["num_threads"] or max(1, physical_cores() // replicas)
    ray.init(include_dashboard=False, log_to_driver=args.log_level == "debug")
    for sig in (signal.SIGINT, signal.SIGTERM):  # while replicas start too: the finally below stops them
        signal.signal(sig, _interrupt)
    try:
        ray_serve.start(http_options={"host": settings.host, "port": settings.port})
        autoscaling = args.min_replicas is not None or args.max_replicas is not None
        ray_serve.run(build_app(args.model, options, settings,
                                num_replicas=None if autoscaling else args.data_parallel_size,
                                min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                                cpus_per_replica=options["num_threads"]),
                      name="nimblelm", route_prefix="/")
        print(f"nimblelm serve: {settings.model_name} on {url}/v1 (ready; Ray Serve, "
              f"{'autoscaling ' + str(args.min_replicas or 1) + '-' + str(replicas) if autoscaling else replicas} "
              f"replica{'s' if replicas > 1 else ''} of {options['num_threads']} "
              f"thread{'s' if options['num_threads'] > 1 else ''})", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    print("nimblelm serve: stopped", file=sys.stderr, flush=True)
    return 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt
