"""Workers placed on a Ray cluster: the same Pool, with Ray's scheduler choosing the node.

    import ray
    from corral import Pool
    from corral.ray import RayLauncher

    ray.init(address="auto")
    launcher = RayLauncher(num_cpus=1, num_gpus=1, start_timeout=300)
    async with Pool("myapp.llm:app", size=4, launcher=launcher) as pool:
        await pool.call("generate", prompt, session="user-42")

Owns: turning each worker start into one Ray actor (its resources, runtime
environment and scheduling options), and what Ray says about it: a request
Ray cannot place (it stays pending forever) ends at ``start_timeout`` with the
actor killed and a ``PlacementError`` naming what was asked for; an actor
that dies before its shim connected back is a ``PlacementError`` too (the
launcher asks Ray whether its node died), never the worker's failure; an
actor that dies later is a backstop for noticing a lost worker. Must not touch: the calls
(they go over corral's own sockets, straight from the pool to the worker, never
through Ray's RPC), supervision (corral restarts workers: every actor has
``max_restarts=0``), or the shim's work (``_launch._shim``). See docs/scale-out.md.

Needs the optional extra: ``pip install 'corral[ray]'``, and corral (with the
worker's code) importable on every node that may host a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import Mapping
from typing import Any

import msgspec

from ._errors import PlacementError, WorkerStartError
from ._launch import WorkerSpec
from ._launch._shim import ShimOrder
from ._launch._socket_launcher import Listener, Placement, ShimLauncher
from ._log import get_logger

__all__ = ["RayLauncher"]

# Ray ships no type information: it is handled as Any, and imported by name so
# that type-checking corral needs no Ray.
try:
    ray: Any = importlib.import_module("ray")
    importlib.import_module("ray.util.scheduling_strategies")
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "corral.ray needs Ray: install corral with the 'ray' extra (pip install 'corral[ray]')"
    ) from exc

_log = get_logger("corral")

# Options corral sets itself, or that would let an actor outlive its pool.
_RESERVED_OPTIONS = frozenset(
    {"max_restarts", "max_task_retries", "lifetime", "max_concurrency", "concurrency_groups"}
)


class _ShimActor:
    """The Ray actor of one worker: it holds the resources and runs the shim.

    It runs no user code itself: the worker is a plain child process of it.
    """

    def run(self, order: bytes, key: bytes) -> int:
        """Connect back to the pool, start the worker, supervise it; its exit status."""
        from corral._launch._shim import run_shim

        return run_shim(
            msgspec.msgpack.decode(order, type=ShimOrder),
            key,
            node_id=ray.get_runtime_context().get_node_id(),
            node_address=ray.util.get_node_ip_address(),
        )


_RemoteShimActor = ray.remote(_ShimActor)


class _RayPlacement:
    """One worker's actor, and the watch on its ``run`` call."""

    def __init__(self, actor: Any, run: Any, described: str) -> None:
        self._actor = actor
        self._described = described
        self.error: BaseException | None = None  # what Ray raised for the run, if it did
        self._stopped = False
        self._finished: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._watch = asyncio.ensure_future(self._wait(run))

    @property
    def finished(self) -> asyncio.Future[str]:
        return self._finished

    async def _wait(self, run: Any) -> None:
        try:
            code = await run
            how = f"the shim returned the worker's exit status {code}"
        except ray.exceptions.RayActorError as exc:
            self.error = exc
            how = f"the Ray actor died: {_first_line(exc)}"
        except ray.exceptions.RayError as exc:
            self.error = exc
            how = f"{type(exc).__name__}: {_first_line(exc)}"
        if not self._finished.done():
            self._finished.set_result(how)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(ray.exceptions.RayError, ValueError):
            ray.kill(self._actor, no_restart=True)

    def describe(self) -> str:
        return self._described

    def actor_id(self) -> str:
        return str(self._actor._actor_id.hex())


def _actor_node(actor_id: str) -> str | None:
    """The id of the node Ray put the actor on; None if not placed yet, or unknown.

    Ray's public state API needs its dashboard; this reads Ray's actor table
    from the cluster's control store, as ``ray.nodes()`` reads its node table.
    """
    try:
        from ray._private import state

        info = state.actors(actor_id=actor_id)
    except (ImportError, AttributeError, ray.exceptions.RayError, ValueError, KeyError):
        return None
    if not isinstance(info, dict):
        return None
    node = (info.get("Address") or {}).get("NodeID")
    return str(node) if node and str(node).strip("0") else None  # all zeros: not placed


def node_alive(node_id: str) -> bool | None:
    """Whether Ray counts that node alive now; None if Ray does not know it."""
    try:
        nodes = ray.nodes()
    except ray.exceptions.RayError:
        return None
    for node in nodes:
        if node.get("NodeID") == node_id:
            return bool(node.get("Alive"))
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    cause = getattr(exc, "cause", None)
    if cause is not None:
        text = f"{type(cause).__name__}: {cause}"
    return text.splitlines()[-1] if text else type(exc).__name__


class RayLauncher(ShimLauncher):
    """Starts each worker inside a Ray actor placed by Ray's scheduler.

    The actor reserves the resources (``num_cpus``, ``num_gpus``, ``memory``,
    ``resources``...), connects back to the pool over TCP, authenticates with a
    fresh single-use ticket, and starts ``python -m corral.worker`` as a plain
    child process that inherits the actor's environment (``runtime_env``, and
    the ``CUDA_VISIBLE_DEVICES`` Ray set for it). Calls then travel on that
    connection, not through Ray.

    Args:
        num_cpus: CPUs each worker's actor reserves.
        num_gpus: GPUs each worker's actor reserves (may be fractional).
        memory: bytes of memory each actor reserves (Ray's ``memory``).
        resources: custom resources each actor reserves.
        accelerator_type: Ray's ``accelerator_type`` constraint.
        runtime_env: Ray's runtime environment for the actor (and so the worker):
            ``pip``, ``env_vars``, ``working_dir``...
        scheduling_strategy: any Ray scheduling strategy (``"SPREAD"``, a
            ``NodeAffinitySchedulingStrategy``...).
        placement_group: a Ray placement group to place every worker in
            (exclusive with ``scheduling_strategy``).
        placement_group_bundle_index: the bundle to use; -1, any bundle with room.
        actor_options: further ``.options()`` for the actor, passed as they are
            (not ``max_restarts``, ``lifetime`` and the like: corral restarts
            workers, and an actor never outlives its pool).
        start_timeout: seconds from asking Ray for the actor until the worker's
            process is running; past it the actor is killed and the start
            fails with ``WorkerStartError`` (Ray keeps an unsatisfiable
            request pending forever). The pool's ``startup_timeout`` then
            bounds the worker's own start-up (imports, ``on_startup``).
        host: the address the pool listens on for its workers; default, the
            address Ray uses for this process (``ray.util.get_node_ip_address()``).
        port: the port to listen on; 0, any free port.
        advertise_host: the address workers connect to, when it differs from
            ``host`` (NAT, containers).
        handshake_timeout: seconds a connecting peer has to authenticate.
        kill_timeout: seconds a killed worker has to report its exit before its
            actor is killed through Ray and the worker declared lost.
    """

    same_host = False

    def __init__(
        self,
        *,
        num_cpus: float | None = 1,
        num_gpus: float | None = None,
        memory: float | None = None,
        resources: Mapping[str, float] | None = None,
        accelerator_type: str | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        scheduling_strategy: Any = None,
        placement_group: Any = None,
        placement_group_bundle_index: int = -1,
        actor_options: Mapping[str, Any] | None = None,
        start_timeout: float = 300.0,
        host: str | None = None,
        port: int = 0,
        advertise_host: str | None = None,
        handshake_timeout: float = 10.0,
        kill_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            host=host or "",
            port=port,
            advertise_host=advertise_host,
            start_timeout=start_timeout,
            handshake_timeout=handshake_timeout,
            kill_timeout=kill_timeout,
        )
        if placement_group is not None and scheduling_strategy is not None:
            raise ValueError("give placement_group or scheduling_strategy, not both")
        reserved = _RESERVED_OPTIONS & set(actor_options or {})
        if reserved:
            raise ValueError(
                f"actor_options may not set {sorted(reserved)}: corral supervises and "
                "restarts its workers itself, and no worker outlives its pool"
            )
        if placement_group is not None:
            scheduling_strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=placement_group_bundle_index
            )
        self.requested: dict[str, Any] = {
            name: value
            for name, value in (
                ("num_cpus", num_cpus),
                ("num_gpus", num_gpus),
                ("memory", memory),
                ("resources", dict(resources) if resources else None),
                ("accelerator_type", accelerator_type),
            )
            if value is not None
        }
        self.options: dict[str, Any] = {
            **self.requested,
            **(actor_options or {}),
            "max_restarts": 0,
            "max_task_retries": 0,
            "max_concurrency": 1,
        }
        if runtime_env is not None:
            self.options["runtime_env"] = dict(runtime_env)
        if scheduling_strategy is not None:
            self.options["scheduling_strategy"] = scheduling_strategy

    def _describe_request(self) -> str:
        asked = ", ".join(f"{k}={v!r}" for k, v in self.requested.items()) or "no resources"
        strategy = self.options.get("scheduling_strategy")
        if strategy is not None:
            asked += f", scheduling_strategy={strategy!r}"
        return asked

    def _acquire(self) -> Listener:
        if not ray.is_initialized():
            raise WorkerStartError(
                "RayLauncher needs a connected Ray: call ray.init(address=...) before "
                "starting the pool"
            )
        if not self.host:
            self.host = ray.util.get_node_ip_address()
        return super()._acquire()

    async def _place(self, spec: WorkerSpec, order: ShimOrder, key: bytes) -> Placement:
        try:
            actor = _RemoteShimActor.options(**self.options).remote()
            run = actor.run.remote(msgspec.msgpack.encode(order), key)
        except (ray.exceptions.RayError, ValueError, TypeError) as exc:
            raise WorkerStartError(
                f"Ray refused the actor for worker {spec.worker_id} "
                f"({self._describe_request()}): {exc}",
                worker_id=spec.worker_id,
            ) from exc
        _log.debug("worker.actor_requested", worker_id=spec.worker_id, options=self.requested)
        return _RayPlacement(actor, run, self._describe_request())

    def _placement_ended(
        self, spec: WorkerSpec, placement: Placement, how: str, listener_busy: bool
    ) -> WorkerStartError:
        """Whose failure was it? Ask Ray what became of the actor and of its node.

        The actor died of a system cause before its shim connected back (its
        node died, it was cancelled before it ran): not the worker's code, a
        ``PlacementError``. The actor's own creation failing (corral not
        importable there) or the shim failing (the pool unreachable) counts.
        """
        error = getattr(placement, "error", None)
        if listener_busy or not isinstance(error, ray.exceptions.RayActorError):
            return super()._placement_ended(spec, placement, how, listener_busy)
        if error.actor_init_failed:
            return super()._placement_ended(spec, placement, how, listener_busy)
        actor_id = getattr(placement, "actor_id", lambda: "")()
        node = _actor_node(actor_id) if actor_id else None
        alive = node_alive(node) if node is not None else None
        message = f"worker {spec.worker_id} could not be placed or connect back: {how}"
        if alive is False:
            return PlacementError(
                f"{message} (its node {node} died)", cause="node_lost", worker_id=spec.worker_id
            )
        return PlacementError(message, cause="placement", worker_id=spec.worker_id)

    def _start_timed_out(self, spec: WorkerSpec, placement: Placement) -> WorkerStartError:
        try:
            total = ray.cluster_resources()
            free = ray.available_resources()
            cluster = f"; the cluster has {_brief(total)} in all, {_brief(free)} free"
        except ray.exceptions.RayError:
            cluster = ""
        return WorkerStartError(
            f"Ray did not start worker {spec.worker_id} within start_timeout="
            f"{self.start_timeout}s: it asked for {placement.describe()}{cluster}. "
            "A request no node can satisfy stays pending in Ray forever; the actor "
            "was killed.",
            worker_id=spec.worker_id,
        )

    def __repr__(self) -> str:
        return f"<corral.ray.RayLauncher {self._describe_request()}>"


def _brief(resources: Mapping[str, float]) -> str:
    shown = {
        k: v
        for k, v in resources.items()
        if not k.startswith("node:") and k not in ("object_store_memory", "memory")
    }
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"
