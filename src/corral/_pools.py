"""Several pools behind one front: workloads, routing rules, fallback, breakers, retries.

    from corral import Pool, Pools, Rule, Workload

    pools = Pools(
        Pool("app.workers:app", size=4, name="fast"),
        Pool("app.workers:app", size=1, name="heavy", max_waiting=8),
        workloads={"fast": Workload(["fast", "heavy"]), "heavy": Workload(["heavy"])},
        rules=[Rule("heavy", methods=["embed", "generate"])],
        default="fast",
    )
    async with pools:
        await pools.call("add", 1, 2)                      # rules pick "fast"
        await pools.call("embed", "text")                  # rules pick "heavy"
        await pools.call("add", 1, 2, workload="heavy")    # or name it

Owns: which workload a call belongs to (rules), which pool of its chain serves
it (fallback), each pool's circuit breakers and retry budget, the session ->
pool pins, the front's counters, events, time series and status. Must not
touch: any pool's internals. Only Pool's public API is used (``start``,
``aclose``, ``call``, ``stream``, ``checkout``, ``close_session``, ``stats``,
``status``), so the pools can change inside without this module noticing.

Decisions (docs/decisions/0025): a call falls back only when the pool refused
it before anything ran (``PoolOverloaded``, ``PoolFailed``, ``PoolTimeout``,
``CircuitOpen``), or, for a call marked idempotent, when it failed without an
answer (``WorkerCrashed``, ``ProtocolError``, ``WorkerStartError``); never
after a ``RemoteError`` or a ``CallTimeout`` (the deadline is spent), never
for a session (its state lives in one worker).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fnmatch
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NoReturn, Protocol, Self

from ._breaker import PROBE, REJECT, BreakerConfig, BreakerState, CircuitBreaker, Transition
from ._door import check_method, check_seconds, check_session_required
from ._errors import (
    AllPoolsFailed,
    CallTimeout,
    CircuitOpen,
    CorralError,
    PoolClosed,
    PoolFailed,
    PoolOverloaded,
    PoolTimeout,
    ProtocolError,
    RemoteError,
    SessionLost,
    WorkerCrashed,
    WorkerStartError,
)
from ._log import get_logger
from ._pool import CallStream, Pool, WorkerLease
from ._retry import RetryBudget, RetryPolicy
from ._stats import LATENCY_BOUNDS, PoolStats

__all__ = [
    "Pools",
    "PoolsStats",
    "RouteSpan",
    "RouteStats",
    "RouteTracer",
    "Routed",
    "RoutedStream",
    "Rule",
    "Workload",
]

_monotonic = time.monotonic
_CLOSED = BreakerState.CLOSED
_log = get_logger("corral")

#: The pool refused the call before anything was sent: any call may go elsewhere.
REFUSALS: tuple[type[CorralError], ...] = (PoolOverloaded, PoolFailed, PoolTimeout, CircuitOpen)
#: The call got no answer; an idempotent call may run again elsewhere.
NO_ANSWER: tuple[type[CorralError], ...] = (WorkerCrashed, ProtocolError, WorkerStartError)
#: The pool's fault: these count as failures in its breaker.
POOL_FAULTS: tuple[type[CorralError], ...] = (
    WorkerCrashed,
    ProtocolError,
    WorkerStartError,
    PoolFailed,
    PoolTimeout,
    CallTimeout,
)


def may_fall_back(exc: CorralError, idempotent: bool) -> bool:
    """May a call that failed with ``exc`` go to the next pool?

    Always when the pool refused it (nothing ran); for an idempotent call also
    when the worker gave no answer, unless the failure lost a session.
    """
    if isinstance(exc, REFUSALS):
        return True
    return idempotent and isinstance(exc, NO_ANSWER) and not isinstance(exc, SessionLost)


_METHODS_CACHED = 10_000
_METHOD_BREAKERS_KEPT = 1_000  # per pool, with per_method: method names come from callers
SERIES_KEPT = 300  # one point a second: the last five minutes
MARKERS_KEPT = 200


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One kind of work: the pools that may serve it, in order, and how it retries.

    ``pools[0]`` serves when it can; the others are the fallback chain, tried in
    order when a pool refuses the call (or, for ``idempotent`` calls, fails it
    without an answer). ``retries`` rounds over the chain may follow once every
    pool refused, after an exponential backoff with jitter, within each pool's
    retry budget. ``idempotent`` is the default of ``call(idempotent=)``.
    """

    pools: Sequence[str]
    idempotent: bool = False
    retries: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if isinstance(self.pools, str):
            raise TypeError("Workload(pools=) takes a sequence of pool names, not a string")
        pools = tuple(self.pools)
        if not pools:
            raise ValueError("a workload needs at least one pool")
        if len(set(pools)) != len(pools):
            raise ValueError(f"a workload names a pool twice: {list(pools)}")
        for name in pools:
            if not isinstance(name, str):
                raise TypeError(f"pool names are str, got {name!r}")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")
        object.__setattr__(self, "pools", pools)


Predicate = Callable[[str, tuple[Any, ...], dict[str, Any]], bool]


class Rule:
    """Picks a workload for calls that name none: by method, by predicate, by weight.

    ``Rule("heavy", methods=["embed", "gen_*"])`` sends those methods (shell
    patterns allowed) to workload ``heavy``; ``when=`` adds a predicate on
    ``(method, args, kwargs)``; both must hold when both are given.
    ``Rule({"stable": 95, "canary": 5})`` splits matching calls by weight (a
    gradual roll-out). Rules are tried in order; the first that matches wins,
    and calls no rule matches go to the front's ``default`` workload.
    """

    __slots__ = ("_cumulative", "_names", "exact", "patterns", "to", "when")

    def __init__(
        self,
        to: str | Mapping[str, float],
        *,
        methods: Iterable[str] | None = None,
        when: Predicate | None = None,
    ) -> None:
        if isinstance(to, str):
            self._names: tuple[str, ...] = (to,)
            self._cumulative: tuple[float, ...] = (1.0,)
        elif isinstance(to, Mapping):
            if not to:
                raise ValueError("Rule weights need at least one workload")
            total = 0.0
            cumulative = []
            for name, weight in to.items():
                if not isinstance(name, str):
                    raise TypeError(f"workload names are str, got {name!r}")
                if not isinstance(weight, int | float) or not weight >= 0:
                    raise ValueError(f"weights are numbers >= 0, got {weight!r} for {name!r}")
                total += weight
                cumulative.append(total)
            if not total > 0:
                raise ValueError("Rule weights must not all be 0")
            self._names = tuple(to)
            self._cumulative = tuple(c / total for c in cumulative)
        else:
            raise TypeError(f"Rule(to=) is a workload name or {{name: weight}}, got {to!r}")
        if isinstance(methods, str):
            raise TypeError("Rule(methods=) takes a sequence of method names, not a string")
        if when is not None and not callable(when):
            raise TypeError(f"Rule(when=) must be callable, got {when!r}")
        names = () if methods is None else tuple(methods)
        self.exact = frozenset(m for m in names if not any(c in m for c in "*?["))
        self.patterns = tuple(m for m in names if any(c in m for c in "*?["))
        self.when = when
        self.to = to if isinstance(to, str) else dict(to)

    @property
    def workloads(self) -> tuple[str, ...]:
        """Every workload this rule may pick."""
        return self._names

    @property
    def any_method(self) -> bool:
        """The rule does not look at the method name."""
        return not self.exact and not self.patterns

    def matches(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this rule takes the call."""
        if (
            not self.any_method
            and method not in self.exact
            and not any(fnmatch.fnmatchcase(method, p) for p in self.patterns)
        ):
            return False
        return self.when is None or bool(self.when(method, args, kwargs))

    def pick(self, draw: float) -> str:
        """The workload for a matching call, given ``draw`` in [0, 1)."""
        if len(self._names) == 1:
            return self._names[0]
        for name, bound in zip(self._names, self._cumulative, strict=True):
            if draw < bound:
                return name
        return self._names[-1]

    @property
    def simple(self) -> bool:
        """Decided by the method name alone (so it can be cached per method)."""
        return self.when is None and len(self._names) == 1

    def __repr__(self) -> str:
        parts = [repr(self.to)]
        if not self.any_method:
            parts.append(f"methods={sorted(self.exact) + list(self.patterns)!r}")
        if self.when is not None:
            parts.append(f"when={getattr(self.when, '__name__', self.when)!r}")
        return f"Rule({', '.join(parts)})"


# --- results and stats ---------------------------------------------------------------


@dataclass(frozen=True)
class Routed:
    """A result and how it was reached: ``Pools.call_routed()`` returns one."""

    value: Any  #: what the handler returned
    pool: str  #: the pool that served the call
    workload: str  #: the workload the call belonged to
    #: pools tried before, and why each did not serve: ``(pool, error)``
    attempts: tuple[tuple[str, CorralError], ...] = ()


@dataclass(frozen=True, kw_only=True)
class RouteStats:
    """The front's view of one pool: what it sent there and what happened."""

    pool: str
    breaker: str  #: closed, open or half_open (the pool's breaker, or its worst method's)
    routed: int  #: attempts sent to the pool
    served: int  #: attempts it answered (results and RemoteErrors)
    failed: int  #: attempts that failed by the pool's fault (counted by its breaker)
    circuit_open: int  #: calls refused here by an open breaker
    fallbacks: int  #: calls that left this pool for the next one of their chain
    retries: int  #: retry attempts sent here
    retries_denied: int  #: retries the pool's budget refused
    transitions: dict[str, int]  #: breaker transitions, as ``"closed->open": n``


@dataclass(frozen=True, kw_only=True)
class PoolsStats:
    """A snapshot of the front and its pools. Take it with ``Pools.stats()``."""

    pools: dict[str, PoolStats]  #: each pool's own ``stats()``
    routes: dict[str, RouteStats]  #: the front's counters, by pool
    workloads: dict[str, int]  #: calls routed, by workload
    exhausted: dict[str, int]  #: calls whose whole chain refused or failed, by workload
    sessions: int  #: sessions pinned to a pool


# --- tracing seam (corral.otel implements it) ------------------------------------------


class RouteSpan(Protocol):
    """One routed call as a tracer sees it."""

    def set(self, key: str, value: str | int | bool) -> None:
        """Set one attribute (``corral.route.*``) on the span."""

    def end(self, error: BaseException | None) -> None:
        """The routed call ended."""


class RouteTracer(Protocol):
    """What the front needs from a tracer: a span around each routed call."""

    def start(self, method: str, workload: str) -> RouteSpan:
        """Open the span of a routed call, current while it runs."""


# --- the members: a pool with its breakers, budget and counters ------------------------


class _Member:
    """One pool of the front, with everything the front keeps about it."""

    __slots__ = (
        "breaker",
        "breakers",
        "budget",
        "circuit_open",
        "failed",
        "fallbacks",
        "front",
        "last_stats",
        "markers",
        "name",
        "pool",
        "retries",
        "retries_denied",
        "routed",
        "series",
        "served",
        "transitions",
    )

    def __init__(
        self, front: Pools, pool: Pool, config: BreakerConfig, policy: RetryPolicy
    ) -> None:
        self.front = front
        self.pool = pool
        self.name = pool.name
        self.breaker = CircuitBreaker(config, name=pool.name, on_transition=front._transitioned)
        self.breakers: dict[str, CircuitBreaker] = {}  # by method, with per_method
        self.budget = RetryBudget(policy)
        self.routed = 0
        self.served = 0
        self.failed = 0
        self.circuit_open = 0
        self.fallbacks = 0
        self.retries = 0
        self.retries_denied = 0
        self.transitions: collections.Counter[str] = collections.Counter()
        self.series: collections.deque[dict[str, Any]] = collections.deque(maxlen=SERIES_KEPT)
        self.markers: collections.deque[dict[str, Any]] = collections.deque(maxlen=MARKERS_KEPT)
        self.last_stats: PoolStats | None = None

    def refused(
        self, breaker: CircuitBreaker, now: float, method: str | None, session: str | None = None
    ) -> CircuitOpen:
        """Count a call its breaker turned away, and the error that says so."""
        self.circuit_open += 1
        where = "" if session is None else f" (session {session!r} lives there and cannot move)"
        return CircuitOpen(
            f"the circuit breaker of pool {self.name} is open{where}",
            pool=self.name,
            retry_after=breaker.retry_after(now),
            method=method,
            session=session,
        )

    def settle(self, breaker: CircuitBreaker, failed: bool | None, probe: bool) -> None:
        """Record how a call ended: True the pool's fault, False it answered, None unknown."""
        breaker.record(_monotonic(), failed, probe)
        if failed:
            self.failed += 1
        elif failed is False:
            self.served += 1

    def breaker_for(self, method: str) -> CircuitBreaker:
        if not self.front._per_method:
            return self.breaker
        breaker = self.breakers.get(method)
        if breaker is None:
            if len(self.breakers) >= _METHOD_BREAKERS_KEPT:
                return self.breaker  # past the bound, further methods share the pool's
            breaker = self.breakers[method] = CircuitBreaker(
                self.breaker.config,
                name=f"{self.name}:{method}",
                on_transition=self.front._transitioned,
            )
        return breaker

    def all_breakers(self) -> list[CircuitBreaker]:
        if not self.front._per_method:
            return [self.breaker]
        shared = [self.breaker] if len(self.breakers) >= _METHOD_BREAKERS_KEPT else []
        return list(self.breakers.values()) + shared

    def worst_state(self) -> str:
        states = {b.state.value for b in self.all_breakers()}
        for state in ("open", "half_open"):
            if state in states:
                return state
        return "closed"


class _Route:
    """A workload, resolved: its members in order and its retry knobs."""

    __slots__ = (
        "calls",
        "chain",
        "counts_budget",
        "exhausted",
        "idempotent",
        "name",
        "policy",
        "retries",
    )

    def __init__(self, name: str, workload: Workload, members: dict[str, _Member]) -> None:
        self.name = name
        self.chain = tuple(members[p] for p in workload.pools)
        self.idempotent = workload.idempotent
        self.retries = workload.retries
        self.policy = workload.retry
        # Only calls that may retry feed the retry budgets (a cheaper hot path for
        # the rest, and a stricter budget: retries are a fraction of those calls).
        self.counts_budget = workload.retries > 0
        self.calls = 0
        self.exhausted = 0


# --- the front ---------------------------------------------------------------------------


class Pools:
    """Several named pools behind one front that routes, falls back and breaks circuits.

    ``pools`` are ``Pool`` objects, each named by its ``name=`` (names must be
    distinct). ``workloads`` maps a workload name to a ``Workload`` (or just a
    list of pool names, its fallback chain); without it, every pool is a
    workload of its own with no fallback. ``rules`` pick the workload of calls
    that name none; ``default`` (default: the first workload) takes the rest.
    ``breaker`` and ``retry`` configure every pool's breaker and retry budget.
    ``sample_interval`` is how often the charts' series gets a point.
    ``log_routes=True`` also logs every served call (``route.served``, debug),
    at the cost of the fast path; fallbacks, retries and breaker moves are
    always logged.

    Start and close it with ``async with pools`` (or ``start()``/``aclose()``):
    the pools start together (if one fails, those started are closed and the
    error propagates) and close together.
    """

    def __init__(
        self,
        *pools: Pool,
        workloads: Mapping[str, Workload | Sequence[str]] | None = None,
        rules: Sequence[Rule] = (),
        default: str | None = None,
        breaker: BreakerConfig | None = None,
        retry: RetryPolicy | None = None,
        sample_interval: float = 1.0,
        log_routes: bool = False,
    ) -> None:
        if not pools:
            raise TypeError("Pools() needs at least one corral.Pool")
        for pool in pools:
            if not isinstance(pool, Pool):
                raise TypeError(f"Pools() takes corral.Pool objects, got {pool!r}")
        names = [p.name for p in pools]
        if len(set(names)) != len(names):
            raise ValueError(f"two pools share a name in {names}: give each a distinct name=")
        if not sample_interval > 0:
            raise ValueError(f"sample_interval must be > 0, got {sample_interval!r}")
        self.breaker_config = breaker or BreakerConfig()
        self.retry_policy = retry or RetryPolicy()
        self._per_method = self.breaker_config.per_method
        self._count_remote = self.breaker_config.count_remote_errors
        self._members = {
            p.name: _Member(self, p, self.breaker_config, self.retry_policy) for p in pools
        }
        if workloads is None:
            workloads = {name: Workload([name]) for name in names}
        if not workloads:
            raise ValueError("workloads must name at least one workload")
        self.workloads: dict[str, Workload] = {}
        for wname, spec in workloads.items():
            if not isinstance(wname, str):
                raise TypeError(f"workload names are str, got {wname!r}")
            workload = spec if isinstance(spec, Workload) else Workload(spec)
            unknown = [p for p in workload.pools if p not in self._members]
            if unknown:
                raise ValueError(
                    f"workload {wname!r} names unknown pools {unknown}; the pools are {names}"
                )
            self.workloads[wname] = workload
        self._routes = {w: _Route(w, spec, self._members) for w, spec in self.workloads.items()}
        self.default = next(iter(self._routes)) if default is None else default
        if self.default not in self._routes:
            raise ValueError(
                f"default workload {self.default!r} is not one of {list(self._routes)}"
            )
        self.rules = tuple(rules)
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"rules are corral.Rule objects, got {rule!r}")
            for wname in rule.workloads:
                if wname not in self._routes:
                    raise ValueError(
                        f"{rule!r} names unknown workload {wname!r}; "
                        f"the workloads are {list(self._routes)}"
                    )
        # method -> route, when every rule looks at the method name alone
        self._by_method: dict[str, _Route] = {}
        self._cacheable = all(rule.simple for rule in self.rules)
        self._pins: dict[str, _Member] = {}  # session -> the pool holding it
        self._tracer: RouteTracer | None = None  # set_tracer(), by corral.otel.instrument()
        self._log_routes = log_routes
        self._traced_or_per_method = self._per_method or log_routes  # the fast path's one test
        self._sample_interval = sample_interval
        self._sampler: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"
        self._random = random.random

    def set_tracer(self, tracer: RouteTracer | None) -> None:
        """Open a span around every routed call from now on (None: stop). See corral.otel."""
        self._tracer = tracer
        self._traced_or_per_method = tracer is not None or self._per_method or self._log_routes

    # --- lifecycle ------------------------------------------------------------------

    @property
    def pools(self) -> dict[str, Pool]:
        """The pools, by name."""
        return {name: m.pool for name, m in self._members.items()}

    def __getitem__(self, name: str) -> Pool:
        return self._members[name].pool

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start every pool, concurrently; if one fails, close them all and raise its error."""
        if self._state != "new":
            raise PoolClosed("this Pools front was already started")
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        outcomes = await asyncio.gather(
            *(m.pool.start() for m in self._members.values()), return_exceptions=True
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            self._state = "open"
            await self.aclose()
            raise errors[0]
        self._state = "open"
        self._sampler = self._loop.create_task(self._sample_forever(), name="corral-pools-sampler")
        _log.info("pools.started", pools=list(self._members), workloads=list(self._routes))

    async def aclose(self) -> None:
        """Close every pool concurrently (each drains its calls); idempotent."""
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        self._state = "closed"
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        outcomes = await asyncio.gather(
            *(m.pool.aclose() for m in self._members.values()), return_exceptions=True
        )
        _log.info("pools.closed")
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    # --- routing ----------------------------------------------------------------------

    def route_of(
        self,
        method: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        workload: str | None = None,
    ) -> str:
        """The workload a call would go to (rules and default applied)."""
        return self._route(method, args, kwargs or {}, workload).name

    def _route(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], workload: str | None
    ) -> _Route:
        """The call's workload: named, cached for its method, or by the rules (slow path)."""
        method = check_method(method)
        if workload is not None:
            route = self._routes.get(workload)
            if route is None:
                raise ValueError(
                    f"unknown workload {workload!r}; the workloads are {list(self._routes)}"
                )
            return route
        if self._cacheable:
            route = self._by_method.get(method)
            if route is None:
                route = self._match(method, args, kwargs)
                if len(self._by_method) < _METHODS_CACHED:
                    self._by_method[method] = route
            return route
        return self._match(method, args, kwargs)

    def _match(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Route:
        """The first matching rule's workload, or the default."""
        for rule in self.rules:
            if rule.matches(method, args, kwargs):
                return self._routes[rule.pick(self._random())]
        return self._routes[self.default]

    def _is_failure(self, exc: BaseException) -> bool | None:
        """True: the pool's fault; False: the pool answered; None: says nothing."""
        if isinstance(exc, RemoteError):
            return self._count_remote
        if isinstance(exc, POOL_FAULTS):
            return True
        return None

    # --- calls ---------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        /,
        *args: Any,
        workload: str | None = None,
        session: str | None = None,
        timeout: float | None = None,
        idempotent: bool | None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``method(*args, **kwargs)`` on the pool its workload picks; return the result.

        ``workload`` names the workload (default: the rules decide).
        ``session`` pins the call to the pool (and worker) holding that session:
        no rule, fallback or retry moves it. ``timeout`` is one deadline over
        every pool tried. ``idempotent`` (default: the workload's) lets a call
        that failed without an answer run again on the next pool; ``retries``
        (default: the workload's) rounds over the chain once every pool refused.

        Raises the pool's own error when the call cannot fall back
        (``RemoteError``, ``CallTimeout``...), ``CircuitOpen``/``PoolOverloaded``/
        ``PoolFailed`` when a one-pool chain refused it, and ``AllPoolsFailed``
        (listing every pool and why) when a longer chain ran out.
        """
        if session is not None:
            return await self._session_call(method, args, kwargs, workload, session, timeout)
        if workload is not None:
            route = self._routes.get(workload)
        else:
            route = self._by_method.get(method) if self._cacheable else None
        if route is None:
            route = self._route(method, args, kwargs, workload)
        member = route.chain[0]
        breaker = member.breaker
        if breaker.state is not _CLOSED or self._traced_or_per_method:
            value, _member, _attempts = await self._run(
                route, method, args, kwargs, timeout, idempotent, retries
            )
            return value
        # The fast path: the first pool's breaker is closed, nothing to trace.
        deadline = None
        if timeout is not None:
            timeout = check_seconds(timeout, "timeout")
            deadline = asyncio.get_running_loop().time() + timeout
        route.calls += 1
        member.routed += 1
        try:
            value = await member.pool.call(method, *args, timeout=timeout, **kwargs)
        except CorralError as exc:
            if not self._failed_here(member, breaker, False, exc, route, idempotent):
                raise
            attempts = self._fell_back(None, member, exc, route, method)
            value, _member, _attempts = await self._run(
                route, method, args, kwargs, timeout, idempotent, retries,
                deadline=deadline, attempts=attempts,
            )  # fmt: skip
            return value
        except BaseException:
            now = _monotonic()
            if route.counts_budget:
                member.budget.called(now)
            breaker.record(now, None)
            raise
        now = _monotonic()
        if route.counts_budget or retries:
            member.budget.called(now)
        breaker.succeeded(now)
        member.served += 1
        return value

    def _failed_here(
        self,
        member: _Member,
        breaker: CircuitBreaker,
        probe: bool,
        exc: CorralError,
        route: _Route,
        idempotent: bool | None,
        retry: bool = False,
    ) -> bool:
        """Count a call that ``member`` failed with ``exc``; may it go to the next pool?"""
        if not retry and route.counts_budget:
            member.budget.called(_monotonic())
        member.settle(breaker, self._is_failure(exc), probe)
        return may_fall_back(exc, route.idempotent if idempotent is None else idempotent)

    async def call_routed(
        self,
        method: str,
        /,
        *args: Any,
        workload: str | None = None,
        session: str | None = None,
        timeout: float | None = None,
        idempotent: bool | None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> Routed:
        """Like ``call()``, and say which pool served it and which were tried first."""
        if session is not None:
            value = await self._session_call(method, args, kwargs, workload, session, timeout)
            member = self._pins[session]
            return Routed(value, member.name, self._route(method, args, kwargs, workload).name)
        route = self._route(method, args, kwargs, workload)
        value, member, attempts = await self._run(
            route, method, args, kwargs, timeout, idempotent, retries
        )
        return Routed(value, member.name, route.name, tuple(attempts or ()))

    async def _run(
        self,
        route: _Route,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        idempotent: bool | None,
        retries: int | None,
        *,
        deadline: float | None = None,
        attempts: list[tuple[str, CorralError]] | None = None,
    ) -> tuple[Any, _Member, list[tuple[str, CorralError]] | None]:
        """Walk the chain (and retry rounds) until a pool serves the call.

        With ``attempts`` (the fast path's first pool failed), the call was
        counted and the first pool tried already: go on from the second.
        """
        span = None if self._tracer is None else self._tracer.start(method, route.name)
        try:
            loop_time = asyncio.get_running_loop().time
            start = 0
            if attempts is None:
                route.calls += 1
                if timeout is not None:
                    timeout = check_seconds(timeout, "timeout")
                deadline = None if timeout is None else loop_time() + timeout
            else:
                start = len(attempts)
            if idempotent is None:
                idempotent = route.idempotent
            rounds = 1 + (route.retries if retries is None else retries)
            for round_no in range(rounds):
                if round_no:
                    delay = route.policy.backoff_for(round_no - 1, self._random())
                    if deadline is not None and loop_time() + delay >= deadline:
                        break
                    _log.info(
                        "route.retry", workload=route.name, method=method, round=round_no,
                        delay=round(delay, 4),
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                for member in route.chain[start if not round_no else 0 :]:
                    now = _monotonic()
                    if round_no:
                        if not member.budget.try_retry(now):
                            member.retries_denied += 1
                            error: CorralError = PoolOverloaded(
                                f"the retry budget of pool {member.name} is spent", method=method
                            )
                            attempts = self._fell_back(attempts, member, error, route, method)
                            continue
                        member.retries += 1
                    breaker = member.breaker_for(method) if self._per_method else member.breaker
                    admission = breaker.admit(now)
                    if admission == REJECT:
                        error = member.refused(breaker, now, method)
                        attempts = self._fell_back(attempts, member, error, route, method)
                        continue
                    remaining = None
                    if deadline is not None:
                        remaining = deadline - loop_time()
                        if remaining <= 0:
                            breaker.record(now, None, admission == PROBE)
                            raise CallTimeout(
                                f"no pool of workload {route.name!r} served the call within "
                                f"{timeout}s",
                                method=method,
                            )
                    member.routed += 1
                    try:
                        value = await member.pool.call(method, *args, timeout=remaining, **kwargs)
                    except CorralError as exc:
                        probe = admission == PROBE
                        if self._failed_here(
                            member, breaker, probe, exc, route, idempotent, bool(round_no)
                        ):
                            attempts = self._fell_back(attempts, member, exc, route, method)
                            continue
                        raise
                    except BaseException:
                        breaker.record(_monotonic(), None, admission == PROBE)
                        raise
                    if not round_no and rounds > 1:
                        member.budget.called(_monotonic())
                    member.settle(breaker, False, admission == PROBE)
                    if self._log_routes:
                        _log.debug(
                            "route.served", workload=route.name, method=method,
                            pool=member.name, fallbacks=len(attempts or ()), round=round_no,
                        )  # fmt: skip
                    if span is not None:
                        self._annotate(span, member, attempts, round_no)
                        span.end(None)
                        span = None
                    return value, member, attempts
            assert attempts is not None
            self._raise_exhausted(route.name, attempts, method)
        except BaseException as exc:
            if span is not None:
                self._annotate(span, None, None, 0)
                span.end(exc)
            raise

    def _fell_back(
        self,
        attempts: list[tuple[str, CorralError]] | None,
        member: _Member,
        error: CorralError,
        route: _Route,
        method: str,
    ) -> list[tuple[str, CorralError]]:
        """Note that ``member`` did not serve the call, and why."""
        if attempts is None:
            attempts = []
        attempts.append((member.name, error))
        member.fallbacks += 1
        _log.info(
            "route.fallback",
            workload=route.name,
            method=method,
            pool=member.name,
            error_type=type(error).__name__,
            error=error.message,
        )
        return attempts

    def _annotate(
        self,
        span: RouteSpan,
        member: _Member | None,
        attempts: list[tuple[str, CorralError]] | None,
        round_no: int,
    ) -> None:
        if member is not None:
            span.set("corral.route.pool", member.name)
            span.set("corral.route.breaker", member.breaker.state.value)
        span.set("corral.route.fallbacks", len(attempts or ()))
        span.set("corral.route.retries", round_no)
        if attempts:
            span.set("corral.route.tried", ",".join(f"{p}:{type(e).__name__}" for p, e in attempts))

    # --- sessions ----------------------------------------------------------------------------

    def _pin(self, session: str, method: str, workload: str | None) -> _Member:
        """The pool holding ``session``; a new session goes to the first pool that admits."""
        session = check_session_required(session)
        member = self._pins.get(session)
        if member is not None:
            return member
        route = self._route(method, (), {}, workload)
        now = _monotonic()
        member = next(
            (m for m in route.chain if m.breaker_for(method).retry_after(now) == 0.0),
            route.chain[0],
        )
        self._pins[session] = member
        _log.info("route.session_pinned", session=session, pool=member.name, workload=route.name)
        return member

    async def _session_call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        workload: str | None,
        session: str,
        timeout: float | None,
    ) -> Any:
        member = self._pin(session, method, workload)
        breaker = member.breaker_for(method)
        now = _monotonic()
        admission = breaker.admit(now)
        if admission == REJECT:
            raise member.refused(breaker, now, method, session)
        member.routed += 1
        probe = admission == PROBE
        try:
            value = await member.pool.call(
                method, *args, session=session, timeout=timeout, **kwargs
            )
        except CorralError as exc:
            member.settle(breaker, self._is_failure(exc), probe)
            raise
        except BaseException:
            member.settle(breaker, None, probe)
            raise
        member.settle(breaker, False, probe)
        return value

    async def close_session(self, session: str) -> None:
        """Drop a session's state in its worker and its pin to a pool."""
        member = self._pins.pop(session, None)
        if member is not None:
            await member.pool.close_session(session)

    def session_pool(self, session: str) -> str | None:
        """The name of the pool holding ``session``, or None if it is not pinned."""
        member = self._pins.get(session)
        return None if member is None else member.name

    # --- streams and checkouts --------------------------------------------------------------

    def stream(
        self,
        method: str,
        /,
        *args: Any,
        workload: str | None = None,
        session: str | None = None,
        timeout: float | None = None,
        idempotent: bool | None = None,
        **kwargs: Any,
    ) -> RoutedStream:
        """Iterate over a generator handler's items, served by the workload's pools.

        Falls back (as ``call()`` does) only before the first item arrives;
        after that, an error ends the stream. A session's stream stays on its pool.
        """
        if session is not None:
            member = self._pin(session, method, workload)
            chain: tuple[_Member, ...] = (member,)
            name = self.session_pool(session) or member.name
            route_name = name
            idem = False
        else:
            route = self._route(method, args, kwargs, workload)
            route.calls += 1
            chain = route.chain
            route_name = route.name
            idem = route.idempotent if idempotent is None else idempotent
        return RoutedStream(self, chain, route_name, method, args, kwargs, session, timeout, idem)

    @contextlib.asynccontextmanager
    async def checkout(
        self,
        *,
        workload: str | None = None,
        session: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[WorkerLease]:
        """Lease one worker of the workload's pools for an ``async with`` block.

        Tries the chain in order while pools refuse (overloaded, failed, breaker
        open, no worker within ``timeout``: ``PoolTimeout``). With ``session``,
        only the pool holding it. ``WorkerLease.pool`` is not exposed: the lease
        belongs to the pool that served it (``session_pool()`` for sessions).
        """
        if session is not None:
            chain: tuple[_Member, ...] = (self._pin(session, "<checkout>", workload),)
            route_name = chain[0].name
        else:
            route = self._route("<checkout>", (), {}, workload)
            route.calls += 1
            chain = route.chain
            route_name = route.name
        attempts: list[tuple[str, CorralError]] = []
        for member in chain:
            breaker = member.breaker_for("<checkout>")
            now = _monotonic()
            admission = breaker.admit(now)
            if admission == REJECT:
                attempts.append((member.name, member.refused(breaker, now, None, session)))
                member.fallbacks += 1
                continue
            member.routed += 1
            manager = member.pool.checkout(session=session, timeout=timeout)
            try:
                lease = await manager.__aenter__()
            except CorralError as exc:
                member.settle(breaker, self._is_failure(exc), admission == PROBE)
                if session is None and isinstance(exc, REFUSALS):
                    attempts.append((member.name, exc))
                    member.fallbacks += 1
                    _log.info("route.fallback", workload=route_name, pool=member.name,
                              error_type=type(exc).__name__, error=exc.message)  # fmt: skip
                    continue
                raise
            except BaseException:
                member.settle(breaker, None, admission == PROBE)
                raise
            outcome: BaseException | None = None
            try:
                yield lease
            except BaseException as exc:
                outcome = exc
                raise
            finally:
                lease_failed = lease.failed
                await manager.__aexit__(None if outcome is None else type(outcome), outcome, None)
                member.settle(breaker, lease_failed, admission == PROBE)
            return
        self._raise_exhausted(route_name, attempts, None)

    def _raise_exhausted(
        self, route_name: str, attempts: list[tuple[str, CorralError]], method: str | None
    ) -> NoReturn:
        route = self._routes.get(route_name)
        if route is not None:
            route.exhausted += 1
        _log.warning(
            "route.exhausted",
            workload=route_name,
            method=method,
            tried=[f"{p}: {type(e).__name__}" for p, e in attempts],
        )
        if len(attempts) == 1:
            raise attempts[0][1]
        raise AllPoolsFailed(
            f"no pool of workload {route_name!r} could serve the call ({len(attempts)} attempts)",
            workload=route_name,
            attempts=tuple(attempts),
            method=method,
        ) from attempts[-1][1]

    # --- events -----------------------------------------------------------------------------

    def _transitioned(self, breaker: CircuitBreaker, transition: Transition) -> None:
        """A breaker changed state: log it, count it, mark it on its pool's chart."""
        pool_name, _, method = breaker.name.partition(":")
        member = self._members.get(pool_name)
        key = f"{transition.source.value}->{transition.target.value}"
        if member is not None:
            member.transitions[key] += 1
            member.markers.append(
                {
                    "time": time.time(),
                    "kind": "breaker",
                    "label": key,
                    "method": method or None,
                    "reason": transition.reason,
                }
            )
        log = _log.warning if transition.target.value == "open" else _log.info
        log(
            f"breaker.{transition.target.value}",
            pool=pool_name,
            method=method or None,
            source=transition.source.value,
            reason=transition.reason,
        )

    # --- stats, status and the time series --------------------------------------------------

    def stats(self) -> PoolsStats:
        """A snapshot: each pool's ``stats()`` and the front's counters."""
        routes = {
            name: RouteStats(
                pool=name,
                breaker=m.worst_state(),
                routed=m.routed,
                served=m.served,
                failed=m.failed,
                circuit_open=m.circuit_open,
                fallbacks=m.fallbacks,
                retries=m.retries,
                retries_denied=m.retries_denied,
                transitions=dict(m.transitions),
            )
            for name, m in self._members.items()
        }
        return PoolsStats(
            pools={name: m.pool.stats() for name, m in self._members.items()},
            routes=routes,
            workloads={name: r.calls for name, r in self._routes.items()},
            exhausted={name: r.exhausted for name, r in self._routes.items()},
            sessions=len(self._pins),
        )

    def breakers(self) -> dict[str, CircuitBreaker]:
        """Every breaker, by ``pool`` or ``pool:method`` (read them; do not drive them)."""
        out: dict[str, CircuitBreaker] = {}
        for m in self._members.values():
            for b in m.all_breakers():
                out[b.name] = b
        return out

    def status(self) -> dict[str, Any]:
        """The front as JSON-ready data, for the status page: a row per pool and its chart."""
        now = _monotonic()
        wall = time.time()
        pools = []
        for name, m in self._members.items():
            pool_status = m.pool.status()
            breakers = []
            for b in m.all_breakers():
                calls, failures = b.window_counts(now)
                breakers.append(
                    {
                        "name": b.name,
                        "state": b.state.value,
                        "retry_after": round(b.retry_after(now), 3),
                        "window_calls": calls,
                        "window_failures": failures,
                        "history": [
                            {
                                "time": wall - (now - t.at),
                                "source": t.source.value,
                                "target": t.target.value,
                                "reason": t.reason,
                            }
                            for t in reversed(b.history)
                        ],
                    }
                )
            stats = pool_status.stats
            pools.append(
                {
                    "name": name,
                    "target": m.pool.target,
                    "state": pool_status.state,
                    "ready": stats.ready,
                    "live": stats.live,
                    "size": stats.size,
                    "breaker": m.worst_state(),
                    "breakers": breakers,
                    "routed": m.routed,
                    "served": m.served,
                    "failed": m.failed,
                    "circuit_open": m.circuit_open,
                    "fallbacks": m.fallbacks,
                    "retries": m.retries,
                    "retries_denied": m.retries_denied,
                    "transitions": dict(m.transitions),
                    "series": list(m.series),
                    "markers": list(m.markers),
                }
            )
        return {
            "time": wall,
            "interval": self._sample_interval,
            "state": self._state,
            "pools": pools,
            "workloads": [
                {
                    "name": name,
                    "pools": [m.name for m in r.chain],
                    "idempotent": r.idempotent,
                    "retries": r.retries,
                    "calls": r.calls,
                    "exhausted": r.exhausted,
                    "default": name == self.default,
                }
                for name, r in self._routes.items()
            ],
            "rules": [repr(rule) for rule in self.rules],
            "sessions": len(self._pins),
        }

    def sample(self) -> None:
        """Add one point to each pool's time series (the sampler calls it every interval)."""
        wall = time.time()
        for m in self._members.values():
            stats = m.pool.stats()
            point: dict[str, Any] = {
                "time": wall,
                "calls": 0.0,
                "failures": 0.0,
                "p50": None,
                "p99": None,
                "breaker": m.worst_state(),
            }
            last = m.last_stats
            if last is not None:
                seconds = max(1e-9, wall - m.series[-1]["time"]) if m.series else 1.0
                calls = stats.calls - last.calls
                failures = _faults(stats) - _faults(last)
                point["calls"] = round(calls / seconds, 3)
                point["failures"] = round(failures / seconds, 3)
                counts = [
                    a - b for a, b in zip(stats.latency.counts, last.latency.counts, strict=True)
                ]
                point["p50"] = _quantile(counts, 0.5)
                point["p99"] = _quantile(counts, 0.99)
                since = m.series[-1]["time"] if m.series else 0.0
                for eviction in m.pool.status().evictions:
                    if eviction.time > since:
                        m.markers.append(
                            {
                                "time": eviction.time,
                                "kind": "eviction",
                                "label": eviction.kind,
                                "method": None,
                                "reason": f"{eviction.worker_id}: {eviction.reason}",
                            }
                        )
            m.last_stats = stats
            m.series.append(point)

    async def _sample_forever(self) -> None:
        while True:
            try:
                self.sample()
            except CorralError as exc:  # a pool closing under the sampler: try next time
                _log.info("pools.sample_skipped", error=exc.message)
            await asyncio.sleep(self._sample_interval)

    def __repr__(self) -> str:
        parts = [f"{n} {m.worst_state()}" for n, m in self._members.items()]
        return f"<corral.Pools {self._state} [{', '.join(parts)}] workloads={list(self._routes)}>"


def _faults(stats: PoolStats) -> int:
    """Calls that failed by the pool's fault (not a handler's exception)."""
    return sum(n for kind, n in stats.calls_failed.items() if kind not in _CALLER_KINDS)


_CALLER_KINDS = frozenset({"RemoteError", "MethodNotFound", "EncodeError", "PayloadTooLarge"})


def _quantile(counts: list[int], q: float) -> float | None:
    """The bucket bound at quantile ``q`` of a latency histogram delta (None: no calls)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    running = 0
    for i, n in enumerate(counts):
        running += n
        if running >= rank:
            return LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else LATENCY_BOUNDS[-1]
    return LATENCY_BOUNDS[-1]


# --- streams ------------------------------------------------------------------------------


class RoutedStream:
    """``async for item in pools.stream(...)``: falls back until the first item arrives."""

    def __init__(
        self,
        front: Pools,
        chain: tuple[_Member, ...],
        workload: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        session: str | None,
        timeout: float | None,
        idempotent: bool,
    ) -> None:
        self._front = front
        self._chain = chain
        self._workload = workload
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._session = session
        self._timeout = timeout
        self._idempotent = idempotent
        self._stream: CallStream | None = None
        self._breaker: CircuitBreaker | None = None
        self._probe = False
        self._member: _Member | None = None
        self._first: list[Any] = []
        self._done = False
        self.attempts: list[tuple[str, CorralError]] = []

    @property
    def pool(self) -> str | None:
        """The pool serving this stream, once its first item (or end) arrived."""
        return None if self._member is None else self._member.name

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        if self._stream is None:
            await self._open()
            if self._first:
                return self._first.pop()
        assert self._stream is not None
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            self._finish(False)
            raise
        except CorralError as exc:
            self._finish(self._front._is_failure(exc))
            raise
        except BaseException:
            self._finish(None)
            raise

    async def _open(self) -> None:
        front = self._front
        loop_time = asyncio.get_running_loop().time
        deadline = None if self._timeout is None else loop_time() + self._timeout
        for member in self._chain:
            breaker = member.breaker_for(self._method)
            now = _monotonic()
            admission = breaker.admit(now)
            if admission == REJECT:
                error = member.refused(breaker, now, self._method, self._session)
                member.fallbacks += 1
                self.attempts.append((member.name, error))
                continue
            remaining = None if deadline is None else max(1e-3, deadline - loop_time())
            member.routed += 1
            stream = member.pool.stream(
                self._method, *self._args, session=self._session, timeout=remaining, **self._kwargs
            )
            self._stream, self._breaker, self._member = stream, breaker, member
            self._probe = admission == PROBE
            try:
                self._first.append(await stream.__anext__())
                return
            except StopAsyncIteration:
                self._finish(False)
                raise
            except CorralError as exc:
                member.settle(breaker, front._is_failure(exc), self._probe)
                self._stream = None
                await stream.aclose()
                if self._session is None and may_fall_back(exc, self._idempotent):
                    member.fallbacks += 1
                    self.attempts.append((member.name, exc))
                    continue
                self._done = True
                raise
            except BaseException:
                self._finish(None)
                raise
        self._done = True
        front._raise_exhausted(self._workload, self.attempts, self._method)

    def _finish(self, failed: bool | None) -> None:
        if self._done:
            return
        self._done = True
        if self._breaker is not None and self._member is not None:
            self._member.settle(self._breaker, failed, self._probe)

    async def aclose(self) -> None:
        """Stop the stream (and the handler in the worker)."""
        stream, self._stream = self._stream, None
        self._finish(None)
        if stream is not None:
            await stream.aclose()

    def __del__(self) -> None:
        # Dropped without aclose(): give a half-open probe slot back, or the breaker
        # would wait for this probe forever. (The pool's own stream cleans up itself.)
        if not self._done:
            self._finish(None)

    async def __aenter__(self) -> RoutedStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
