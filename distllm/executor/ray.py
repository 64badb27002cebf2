"""Ray-managed workers (``distributed_executor_backend="ray"``, the default for tp > 1).

Ray places, starts, watches and stops the workers; it never carries step plans. Each rank is a
Ray actor in a placement group (one bundle per GPU, or per CPU on CPU; STRICT_PACK on one node,
PACK/SPREAD allowed across nodes). The actor's long-running ``run()`` method is
``worker_proc.run_worker``: the same loop as the ``mp`` workers, fed by the same ZeroMQ
transport. Liveness: ``ray.wait`` on those ``run()`` refs (an actor death makes its ref ready
with an error).
"""

from __future__ import annotations

import os
from typing import Any

from distllm.executor.base import EngineDeadError
from distllm.executor.mp import TransportExecutor
from distllm.logger import init_logger

logger = init_logger(__name__)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PG_TIMEOUT_S = float(os.environ.get("DISTLLM_RAY_PG_TIMEOUT_S", "120"))


def local_ray_init_kwargs(num_cpus: int | None = None, num_gpus: int | None = None) -> dict[str, Any]:
    """Options for a Ray cluster that distllm starts itself: loopback only, light, no dashboard.

    Token authentication: Ray >= 2.5x turns it on by default for a new local cluster (a token in
    ~/.ray/auth_token, made if missing) unless ``RAY_AUTH_MODE=disabled``; we never disable it.
    """
    kw: dict[str, Any] = dict(
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address=os.environ.get("DISTLLM_RAY_NODE_IP", "127.0.0.1"),
        object_store_memory=int(os.environ.get("DISTLLM_RAY_OBJECT_STORE_BYTES", 80 * 1024 * 1024)),
        configure_logging=False,
    )
    if num_cpus is not None:
        kw["num_cpus"] = num_cpus
    if num_gpus is not None:
        kw["num_gpus"] = num_gpus
    return kw


def ensure_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Connect to a Ray cluster (``address``, else RAY_ADDRESS) or start a local one.

    Returns True when this call started the local cluster (the caller then owns its shutdown).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return False
    node_ip = os.environ.get("DISTLLM_RAY_NODE_IP", "127.0.0.1")
    if node_ip in ("127.0.0.1", "localhost", "::1"):
        # Ray maps a loopback node address to the host's routable IP and binds its gRPC ports on
        # every interface, unless cluster mode is off; off = every Ray port on 127.0.0.1 only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    # Workers of a cluster we start inherit our environment: make sure they import this distllm.
    pp = os.environ.get("PYTHONPATH", "")
    if _REPO_ROOT not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = _REPO_ROOT + (os.pathsep + pp if pp else "")
    ray.init(address="local", **local_ray_init_kwargs(num_cpus, num_gpus))
    return True


# Executors using a local cluster that one of them started: the last one out shuts it down.
_owned_cluster_users = 0


def _actor_class():
    import ray

    @ray.remote(max_restarts=0)
    class DistllmRayWorker:
        """One tensor-parallel rank; ``run`` blocks for the worker's whole life."""

        def __init__(self) -> None:
            self._stop = False

        def info(self) -> dict[str, Any]:
            import socket

            ctx = ray.get_runtime_context()
            ids = [str(g) for g in ray.get_gpu_ids()]
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            return {
                "pid": os.getpid(),
                "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address(),
                "gpu_ids": ids,
                "free_port": port,
            }

        def run(self, engine_config, transport_config, rank, local_rank, init_method, env) -> None:
            os.environ.update(env)  # before anything initialises CUDA
            from distllm.executor.worker_proc import run_worker

            run_worker(engine_config, transport_config, rank, local_rank, init_method)

    return DistllmRayWorker


class RayExecutor(TransportExecutor):
    def __init__(self, config):
        super().__init__(config)
        self.owns_cluster = False
        self.actors: list = []
        self.run_refs: list = []
        self.pg = None
        self._placement_strategy = os.environ.get("DISTLLM_RAY_PLACEMENT_STRATEGY")  # set by `distllm launch`

    def start(self) -> int:
        import ray

        use_gpu_local = self.config.device == "cuda" or (self.config.device == "auto" and _local_gpus() > 0)
        global _owned_cluster_users
        started = ensure_ray(num_cpus=max(self.tp, os.cpu_count() or 1) if not use_gpu_local else None)
        if started or _owned_cluster_users > 0:
            self.owns_cluster = True
            _owned_cluster_users += 1
        self._use_gpu_flag = self.config.device == "cuda" or (
            self.config.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0
        )
        self._reserve()
        return super().start()

    def _reserve(self) -> None:
        import ray
        from ray.util.placement_group import placement_group

        res = "GPU" if self._use_gpu_flag else "CPU"
        have = ray.cluster_resources().get(res, 0)
        if have < self.tp:
            raise ValueError(
                f"tensor_parallel_size={self.tp} needs {self.tp} {res}s but the Ray cluster has {have:g} "
                f"({ray.cluster_resources()})."
            )
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        strategy = self._placement_strategy or ("STRICT_PACK" if nodes <= 1 else "PACK")
        self.pg = placement_group([{res: 1}] * self.tp, strategy=strategy, name=f"distllm-{os.getpid()}-{id(self):x}")
        ready, _ = ray.wait([self.pg.ready()], timeout=_PG_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            self.pg = None
            raise ValueError(
                f"could not place {self.tp} {res} bundles ({strategy}) within {_PG_TIMEOUT_S:.0f} s; "
                f"cluster resources {ray.cluster_resources()}, available {ray.available_resources()}"
            )

    def _launch_workers(self, engine_config: dict[str, Any], transport_config: dict[str, Any]) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cls = _actor_class()
        opts: dict[str, Any] = {"num_cpus": 0 if self._use_gpu_flag else 1}
        if self._use_gpu_flag:
            opts["num_gpus"] = 1
        runtime_env = self._runtime_env()
        if runtime_env:
            opts["runtime_env"] = runtime_env
        for rank in range(self.tp):
            strat = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
            self.actors.append(cls.options(scheduling_strategy=strat, name=None, **opts).remote())
        infos = ray.get([a.info.remote() for a in self.actors], timeout=_PG_TIMEOUT_S)
        self.worker_pids.update({r: i["pid"] for r, i in enumerate(infos)})
        init_method, envs, local_ranks = self._dist_setup(infos)
        self.run_refs = [
            a.run.remote(engine_config, transport_config, rank, local_ranks[rank], init_method, envs[rank])
            for rank, a in enumerate(self.actors)
        ]
        logger.info("ray executor: %d actors on nodes %s", self.tp, sorted({i["node_ip"] for i in infos}))

    def _runtime_env(self) -> dict[str, Any] | None:
        if self.owns_cluster:
            return None  # the local cluster's workers inherit our PYTHONPATH
        import ray

        try:
            job_env = ray.get_runtime_context().runtime_env or {}
        except Exception:  # noqa: BLE001
            job_env = {}
        if job_env.get("working_dir") or job_env.get("py_modules"):
            return None  # `ray job submit --working-dir .` ships distllm with the job
        return {"env_vars": {"PYTHONPATH": _REPO_ROOT}}

    def _make_transport(self):
        from distllm.distributed.transport import TransportConfig

        import ray

        driver_ip = ray.util.get_node_ip_address()
        self._single_host = True
        # Decided again in _dist_setup once the actors are placed; ipc only when every actor
        # shares this host (placement is known only after the pg is ready, which it is here).
        nodes = {b.get("node_id") for b in _pg_bundle_nodes(self.pg)} if self.pg is not None else set()
        here = ray.get_runtime_context().get_node_id()
        self._single_host = nodes <= {here}
        if self._single_host:
            return TransportConfig.create("ipc")
        host = os.environ.get("DISTLLM_TRANSPORT_HOST", driver_ip)
        return TransportConfig.create("tcp", host=host)

    def _dist_setup(self, infos: list[dict[str, Any]]):
        """torch.distributed init method, per-rank env (CUDA_VISIBLE_DEVICES) and local ranks."""
        if self._single_host and self.transport.ipc_dir:
            init_method = f"file://{os.path.join(self.transport.ipc_dir, 'tp_store')}"
        else:
            init_method = f"tcp://{infos[0]['node_ip']}:{infos[0]['free_port']}"
        envs: list[dict[str, str]] = [{} for _ in infos]
        local_ranks = [0] * len(infos)
        if self._use_gpu_flag:
            # One process per GPU, but each sees all GPUs Ray gave this node's ranks (NCCL P2P
            # and CUDA IPC need peers visible); local_rank picks its own.
            by_node: dict[str, list[str]] = {}
            for i in infos:
                by_node.setdefault(i["node_id"], []).extend(i["gpu_ids"])
            for r, i in enumerate(infos):
                ids = sorted(set(by_node[i["node_id"]]), key=lambda x: int(x) if x.isdigit() else x)
                envs[r]["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
                local_ranks[r] = ids.index(i["gpu_ids"][0])
        return init_method, envs, local_ranks

    def _check_workers(self) -> None:
        import ray

        if not self.run_refs:
            return
        ready, _ = ray.wait(self.run_refs, num_returns=len(self.run_refs), timeout=0)
        for ref in ready:
            rank = self.run_refs.index(ref)
            try:
                ray.get(ref, timeout=0)
                why = "its worker loop returned"
            except Exception as e:  # noqa: BLE001 - RayActorError, RayTaskError, ...
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise EngineDeadError(f"worker rank {rank} (ray actor, pid {self.worker_pids.get(rank)}) died: {why}")

    def _stop_workers(self, graceful: bool) -> None:
        import ray

        try:
            if graceful and self.run_refs:
                ray.wait(self.run_refs, num_returns=len(self.run_refs), timeout=5.0)
            for a in self.actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
            if self.pg is not None:
                try:
                    ray.util.remove_placement_group(self.pg)
                except Exception:  # noqa: BLE001
                    pass
        finally:
            self.actors, self.run_refs, self.pg = [], [], None
            if self.owns_cluster:
                global _owned_cluster_users
                self.owns_cluster = False
                _owned_cluster_users -= 1
                if _owned_cluster_users == 0 and ray.is_initialized():
                    ray.shutdown()


def _pg_bundle_nodes(pg) -> list[dict[str, Any]]:
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(pg)
    return [{"node_id": n} for n in (table.get("bundles_to_node_id") or {}).values()]


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


