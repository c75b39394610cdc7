"""Executors: where the ranks of the model run, behind one seam. The engine calls collective_rpc (every rank runs
the same Worker method, in parallel) and execute (a step; every rank runs it, rank 0's sampled tokens come back).

- uni: one rank, in the engine's process.
- mp: one local process per rank (spawned), sent each call through a pipe.
- ray: one Ray actor per rank, placed by a placement group on one machine or many (RAY_ADDRESS picks the
  cluster; without it a local one starts).

Every rank receives the step contract (engine/step.py) and nothing else; the collectives inside the model go
through torch.distributed between the ranks themselves.
"""

from __future__ import annotations

import multiprocessing
import traceback
import weakref

from nimblelm.distributed.worker import RunnerSpec, Worker, free_port
from nimblelm.engine.step import ModelRunnerOutput, SchedulerOutput
from nimblelm.errors import InvalidRequestError, NimbleLMError

BACKENDS = ("uni", "mp", "ray")


class Executor:
    output_rank = 0  # the rank whose sampled tokens are the step's: the first of the last pipeline stage

    def collective_rpc(self, method: str, *args) -> list:
        """Every rank's Worker.method(*args), in rank order."""
        raise NotImplementedError

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute", sched)[self.output_rank]

    def close(self) -> None:
        """Stop the ranks (an engine that is dropped closes its executor)."""


class UniExecutor(Executor):
    def __init__(self, worker: Worker):
        self.worker = worker

    def collective_rpc(self, method: str, *args) -> list:
        return [getattr(self.worker, method)(*args)]


def make_executor(backend: str | None, spec: RunnerSpec) -> Executor:
    """The executor of the spec's ranks by backend name (None: mp); uni is built by the engine around its own
    runner."""
    backend = backend or "mp"
    if backend in ("mp", "ray"):
        executor = (MultiprocExecutor if backend == "mp" else RayExecutor)(spec)
        executor.output_rank = spec.world_size - spec.tensor_parallel_size
        return executor
    raise InvalidRequestError(f"distributed_executor_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


class _Host:
    """A rank's home in a process or an actor: the Worker once started, and its calls."""

    worker: Worker | None = None

    def start(self, *args) -> None:
        self.worker = Worker.start(*args)

    def call(self, method: str, args: tuple):
        return getattr(self.worker, method)(*args)

    @staticmethod
    def node_ip() -> str:
        import ray

        return ray.util.get_node_ip_address()

    @staticmethod
    def free_port() -> int:
        return free_port()


def _serve(conn, spec: RunnerSpec, rank: int, init_method: str) -> None:
    """A local rank's process: start, then answer calls until told to stop (None) or the engine is gone."""
    host = _Host()
    request = ("start", (spec, rank, init_method, rank, spec.world_size))
    while request[0] is not None:
        method, args = request
        try:
            reply = (True, host.start(*args) if method == "start" else host.call(method, args))
        except Exception as e:  # noqa: BLE001 - every failure goes back to the engine, which raises it
            reply = (False, e if isinstance(e, NimbleLMError) else RuntimeError(f"rank {rank}: {traceback.format_exc()}"))
        conn.send(reply)
        try:
            request = conn.recv()
        except EOFError:
            break
    if host.worker is not None:
        host.worker.close()


class MultiprocExecutor(Executor):
    def __init__(self, spec: RunnerSpec):
        ctx = multiprocessing.get_context("spawn")  # torch's threads do not survive a fork
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.conns, self.procs = [], []
        for rank in range(spec.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, spec, rank, init_method), daemon=True,
                               name=f"nimblelm-rank{rank}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs)
        try:
            self._gather()
        except BaseException:
            self.close()
            raise

    def collective_rpc(self, method: str, *args) -> list:
        for conn in self.conns:
            conn.send((method, args))
        return self._gather()

    def _gather(self) -> list:
        replies = []
        for rank, conn in enumerate(self.conns):
            try:
                replies.append(conn.recv())
            except EOFError:
                raise RuntimeError(f"rank {rank} exited (exit code {self.procs[rank].exitcode})") from None
        for ok, value in replies:
            if not ok:
                raise value
        return [value for _, value in replies]

    def close(self) -> None:
        self._finalizer()


def _stop(conns, procs) -> None:
    for conn in conns:
        try:
            conn.send((None, ()))
        except (OSError, ValueError):
            pass
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()


class RayExecutor(Executor):
    def __init__(self, spec: RunnerSpec):
        size = spec.world_size
        try:
            import ray
            from ray.util.placement_group import placement_group, remove_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError:
            raise InvalidRequestError("distributed_executor_backend='ray' needs Ray: pip install 'nimblelm[ray]'") from None
        if not ray.is_initialized():
            ray.init(include_dashboard=False)  # joins the cluster at RAY_ADDRESS when it is set
        gpu = spec.options["device"].type == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": spec.num_threads}
        self.group = placement_group([bundle] * size, strategy="PACK")
        ray.get(self.group.ready(), timeout=300)
        self._ray = ray
        actor = ray.remote(_Host)
        self.actors = [
            actor.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
            ).remote()
            for rank in range(size)
        ]
        self._finalizer = weakref.finalize(self, _kill, ray, self.actors, self.group, remove_placement_group)
        ips = ray.get([a.node_ip.remote() for a in self.actors])
        init_method = f"tcp://{ips[0]}:{ray.get(self.actors[0].free_port.remote())}"
        # Ranks on one machine share its cores: each takes the slice its index there gives. Ray shows each GPU
        # actor only its own GPU, device 0.
        local = [0 if gpu else ips[:rank].count(ip) for rank, ip in enumerate(ips)]
        try:
            ray.get([a.start.remote(spec, rank, init_method, local[rank], ips.count(ips[rank]))
                     for rank, a in enumerate(self.actors)])
        except BaseException:
            self.close()
            raise

    def collective_rpc(self, method: str, *args) -> list:
        return self._ray.get([a.call.remote(method, args) for a in self.actors])

    def close(self) -> None:
        self._finalizer()


def _kill(ray, actors, group, remove_placement_group) -> None:
    """The ranks' actors, and the CPUs (or GPUs) their placement group holds."""
    for actor in actors:
        ray.kill(actor)
    remove_placement_group(group)
