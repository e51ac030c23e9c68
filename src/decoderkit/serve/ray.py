"""Replicas on Ray Serve: each replica is our engine behind our OpenAI routes; Ray's HTTP proxy spreads requests.

    from decoderkit.serve.ray import build_app, run
    serve.run(build_app("path/to/model", num_replicas=2))      # or: decoderkit serve MODEL --ray --replicas 2

The deployment is a `serve.ingress` class whose FastAPI app is `decoderkit.serve.app.create_app` over the replica's
own `Engine` (built in the replica, so the model is loaded where it runs). `num_replicas` fixes the count;
`autoscaling_config` (Ray's `min_replicas`, `max_replicas`, `target_ongoing_requests`, ...) lets Ray choose it.

Metrics: `/metrics` through the proxy answers from whichever replica the request reaches, so each replica also
publishes its engine's state as Ray metrics (`ray.util.metrics` gauges tagged with the replica id), which Ray
exports in Prometheus format on each node's metrics port (`ray.init(_metrics_export_port=...)`): every replica's
series, scraped in one place.

Needs the `ray` extra: `pip install 'decoderkit[ray]'`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

RAY_EXTRA = "pip install 'decoderkit[ray]' (ray[serve])"
METRICS_PERIOD_S = 1.0
DEPLOYMENT_NAME = "decoderkit"


def require_ray() -> Any:
    """The `ray.serve` module, or an ImportError naming the extra to install."""
    try:
        from ray import serve
    except ImportError as err:
        raise ImportError(f"decoderkit.serve.ray needs Ray Serve, which is not installed ({err}); "
                          f"install the extra: {RAY_EXTRA}") from None
    return serve


class _ReplicaMetrics:
    """Copies the engine's stats into Ray gauges tagged with this replica's id, once a period, on a thread."""

    FIELDS = {
        "waiting": "Requests waiting for admission.",
        "running": "Requests in the running batch.",
        "free_blocks": "Free KV-cache blocks.",
        "total_blocks": "KV-cache blocks in all.",
        "generated_tokens_total": "Tokens generated since the replica started.",
        "tokens_per_second": "Tokens generated per second, recent average.",
        "ttft_count": "Requests that produced a first token.",
    }

    def __init__(self, engine: Any, replica: str) -> None:
        from ray.util.metrics import Gauge

        self.engine, self.replica = engine, replica
        self.gauges = {name: Gauge(f"decoderkit_replica_{name}", description=help_, tag_keys=("replica",))
                       for name, help_ in self.FIELDS.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decoderkit-ray-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(METRICS_PERIOD_S):
            self.publish()

    def publish(self) -> None:
        stats = self.engine.stats()
        for name, gauge in self.gauges.items():
            gauge.set(float(getattr(stats, name)), tags={"replica": self.replica})

    def stop(self) -> None:
        self._stop.set()


def _deployment_class() -> type:
    serve = require_ray()

    @serve.ingress()
    class DecoderkitReplica:
        """One replica: the model, its engine and the OpenAI app."""

        def __init__(self, model_path: str, served_model_name: str, engine_options: dict[str, Any],
                     load_options: dict[str, Any], api_key: str | None, tensor_parallel: int = 1) -> None:
            from decoderkit.auto import AutoModelForCausalLM
            from decoderkit.serve.app import ServerSettings
            from decoderkit.serve.engine import Engine
            from decoderkit.tokenizer import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_path)
            group = None
            if tensor_parallel > 1:
                from decoderkit.parallel.launch import start_tensor_parallel

                # The replica is rank 0; its followers are processes of its own (they exit when it does)
                group = start_tensor_parallel(model_path, tensor_parallel, **load_options)
                model = group.model
            else:
                model = AutoModelForCausalLM.from_pretrained(model_path, **load_options)
            self.engine = Engine(model, tokenizer, **engine_options)
            if group is not None:
                group.attach_engine(self.engine)
            self.settings = ServerSettings(model_name=served_model_name, api_key=api_key, model_path=model_path)
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.metrics = _ReplicaMetrics(self.engine, self.replica)

        def __serve_build_asgi_app__(self) -> Any:
            from decoderkit.serve.app import create_app

            app = create_app(self.engine, self.settings)
            replica = self.replica

            @app.middleware("http")
            async def name_the_replica(request: Any, call_next: Any) -> Any:
                response = await call_next(request)
                response.headers["x-decoderkit-replica"] = replica
                return response

            return app

        def __del__(self) -> None:
            metrics = getattr(self, "metrics", None)
            if metrics is not None:
                metrics.stop()

    return DecoderkitReplica


def build_app(model_path: str | Path, *, num_replicas: int | None = 1, autoscaling_config: dict[str, Any] | None = None,
              served_model_name: str | None = None, ray_actor_options: dict[str, Any] | None = None,
              engine_options: dict[str, Any] | None = None, load_options: dict[str, Any] | None = None,
              api_key: str | None = None, tensor_parallel: int = 1) -> Any:
    """A Ray Serve application (for `serve.run`) of `num_replicas` replicas of the model at `model_path`, or as many
    as `autoscaling_config` says. `ray_actor_options` reserve resources per replica (default one CPU per rank, or
    one GPU per rank on CUDA); `engine_options` go to `Engine` (max_batch_size, kv_cache_tokens, ...), `load_options`
    to `from_pretrained`. `tensor_parallel` > 1 splits each replica's model over that many ranks, started by the
    replica (`decoderkit.parallel.launch`) on its own node."""
    serve = require_ray()
    path = Path(model_path).expanduser().resolve()
    if not (path / "config.json").exists() and path.suffix != ".gguf":
        raise FileNotFoundError(f"{path}: not a model directory (no config.json) or .gguf file")
    if autoscaling_config is not None:
        num_replicas = None
    elif num_replicas is None or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive integer (or pass autoscaling_config), got {num_replicas!r}")
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be a positive integer, got {tensor_parallel!r}")
    if tensor_parallel > 1:
        from decoderkit.config import DecoderConfig
        from decoderkit.parallel.tensor_parallel import partition

        if path.is_dir():  # a size that does not split the model fails here, before Ray starts a replica
            partition(DecoderConfig.from_pretrained(path), 0, tensor_parallel)
    cuda = str((load_options or {}).get("device") or "cpu").startswith("cuda")
    per_replica = {"num_gpus": tensor_parallel} if cuda else {"num_cpus": tensor_parallel}
    options: dict[str, Any] = {"name": DEPLOYMENT_NAME, "ray_actor_options": ray_actor_options or per_replica}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    deployment = serve.deployment(_deployment_class()).options(**options)
    return deployment.bind(str(path), served_model_name or path.name, dict(engine_options or {}),
                           dict(load_options or {}), api_key, tensor_parallel)


def run(model_path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, metrics_port: int | None = None,
        blocking: bool = True, **options: Any) -> Any:
    """Start a local Ray instance (or join `RAY_ADDRESS`'s), serve `build_app(model_path, **options)` on Ray's HTTP
    proxy at host:port, and with `blocking` wait until interrupted, then shut Serve and Ray down."""
    import ray

    serve = require_ray()
    if not ray.is_initialized():
        init: dict[str, Any] = {"include_dashboard": False}
        if metrics_port is not None:
            init["_metrics_export_port"] = metrics_port
        ray.init(**init)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(model_path, **options), name=DEPLOYMENT_NAME, route_prefix="/")
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
    return handle


def shutdown() -> None:
    """Stop Serve's applications and proxy, then the Ray instance this process started or joined."""
    import ray

    serve = require_ray()
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
