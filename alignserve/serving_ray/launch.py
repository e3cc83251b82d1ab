"""``alignserve serve --replicas N``: start (or join) Ray, deploy N engine replicas with Ray
Serve, and serve the ingress on ``--host:--port`` until stopped.

Each replica is its own Serve application ``alignserve-PORT-rI`` holding one deployment with
one replica (``EngineReplica``), so the ingress, not Serve's request-count router, decides
where each request goes; Serve restarts a replica whose process dies. Serve's own HTTP proxy is
not started (``proxy_location="Disabled"``): the ingress is this process.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("alignserve.ray")


def replica_options(args: argparse.Namespace) -> dict:
    """Ray actor options of one replica from ``--replica-cpus`` / ``--replica-gpus``."""
    gpus = args.replica_gpus
    if gpus is None:
        gpus = 1.0 if str(args.device).startswith("cuda") else 0.0
    opts: dict = {"num_cpus": args.replica_cpus, "num_gpus": gpus}
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HOME", "ALIGNSERVE_CACHE",
                                      "XDG_CACHE_HOME")
           if k in os.environ}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


def replica_args(args: argparse.Namespace, keys: list[str]) -> argparse.Namespace:
    """The arguments each replica builds its server from: API keys resolved here (a key file
    need not exist on the other nodes), threads defaulting to the replica's CPU share."""
    out = copy.copy(args)
    out.api_key, out.api_keys_file = list(keys), None
    if out.threads is None:
        out.threads = max(1, int(round(args.replica_cpus)))
    return out


def deploy_error(names: list[str]) -> str | None:
    """The last line of the first failed replica's error (the exception its server raised)."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # noqa: BLE001
        return None
    for name in names:
        app = apps.get(name)
        for dep in (app.deployments.values() if app else []):
            lines = [ln.strip() for ln in (dep.message or "").splitlines() if ln.strip()]
            if lines:
                return lines[-1]
    return None


def serve_replicas(args: argparse.Namespace) -> int:
    """Run the replicated server; returns the process exit code."""
    from ..server.main import api_keys

    if args.base_url:
        print("error: --replicas cannot be combined with --base-url", file=sys.stderr)
        return 2
    if args.replicas < 1:
        print("error: --replicas must be at least 1", file=sys.stderr)
        return 2
    try:
        keys = api_keys(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..engine.model_store import ModelError, resolve_model

    try:  # fail fast on a bad --model, and convert the default model once, not per replica
        resolve_model(args.model)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    local = not args.ray_address  # the settings below must precede the import of ray
    if local:  # Ray starts workers at niceness 15; the replicas are this server's main work
        os.environ.setdefault("RAY_worker_niceness", "0")
    elif "RAY_AUTH_MODE" not in os.environ and (
            "RAY_AUTH_TOKEN" in os.environ or "RAY_AUTH_TOKEN_PATH" in os.environ
            or (Path.home() / ".ray" / "auth_token").is_file()):
        # joining by address, Ray 2.60 does not switch token auth on from a token it has (as
        # `ray start` does); clusters started with a token refuse the connection otherwise
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray
    from ray import serve

    from ..server.state import ServerLimits
    from .ingress import Ingress
    from .replica import EngineReplica

    # "local": always a new Ray of our own, even where `ray start` left one running here
    ray.init(address=args.ray_address or "local", namespace="alignserve",
             include_dashboard=False, log_to_driver=args.log_level == "debug",
             logging_level=logging.WARNING, ignore_reinit_error=True)
    serve.start(proxy_location="Disabled")
    dep = serve.deployment(EngineReplica)
    rargs = replica_args(args, keys)
    names = [f"alignserve-{args.port}-r{i}" for i in range(args.replicas)]
    targets = [serve.RunTarget(
        dep.options(name="engine", num_replicas=1, ray_actor_options=replica_options(args),
                    max_ongoing_requests=100_000, health_check_period_s=2.0,
                    graceful_shutdown_timeout_s=5.0, max_constructor_retry_count=3,
                    ).bind(rargs, i),
        name=name, route_prefix=None) for i, name in enumerate(names)]
    try:
        try:
            handles = serve.run_many(targets)
        except Exception as exc:  # noqa: BLE001 - a replica failed to build its server
            print(f"error: the engine replicas did not start: {deploy_error(names) or exc}",
                  file=sys.stderr)
            return 2
        limits = ServerLimits(max_tokens=args.max_tokens, max_n=args.max_n,
                              max_body_bytes=args.max_body_bytes,
                              body_timeout_s=args.body_timeout)
        app = Ingress(handles, limits, keys)
        import uvicorn

        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if not local:  # leave the cluster as we found it; a local Ray goes away whole below
            for name in names:
                try:
                    serve.delete(name, _blocking=False)
                except Exception as exc:  # noqa: BLE001 - best effort on the way out
                    log.warning("could not delete %s: %s", name, exc)
        ray.shutdown()
    return 0
