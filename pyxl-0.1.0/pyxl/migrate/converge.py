"""Switch-over policies in Python, and auto-converge.

With a ``policy``, pyxl's helper asks the host once per precopy round (the
``precopy_round`` message, pyxl's extension of the callback protocol,
``PYXL_PRECOPY=host``) and the toolstack decides:

* :class:`RoundStats` -- what the policy is given: round, pages sent in the last
  round, pages dirty now, dirty rate and bandwidth (pages/s), the helper's
  predicted downtime of stopping now (s, None: unknown), elapsed time (s) and the
  CPU cap in force (percent of one CPU, 0: uncapped);
* a decision -- :data:`CONTINUE`, :data:`STOP` (stop and copy), :data:`ABORT`, or a
  :class:`Throttle` (set the guest's scheduler cap, then continue).

:func:`target_policy` is pyxl's own: stop once the predicted downtime fits the
target; with ``auto_converge``, when the pages dirtied per round shrink too
slowly to reach the target within ``converge_rounds`` rounds (dirty rate x
round time vs bandwidth), cap the guest's CPU, at most halving it per round,
down to ``min_cap``.  A guest that converges by copying alone is never capped.

:class:`PolicyDriver` runs a policy for one migration: it checks each answer
(anything else is a :class:`~pyxl.errors.PrecopyPolicyError`), enforces the
deadline, applies throttles through the backend (``cpu_cap``/``set_cpu_cap``)
and puts the original cap back (:meth:`PolicyDriver.restore`), which the
migration calls on every way out.

May import: pyxl._log, pyxl.errors, pyxl.loop, pyxl.wire.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, List, Optional, Union

from pyxl._log import get_logger
from pyxl.errors import PrecopyPolicyError
from pyxl.loop import Loop, Timer
from pyxl.wire.codec import PrecopyRound

__all__ = ["ABORT", "CONTINUE", "STOP", "Decision", "Policy", "PolicyDriver", "RoundStats",
           "Throttle", "target_policy"]

CONTINUE = "continue"
STOP = "stop-and-copy"
ABORT = "abort"
#: libxc's precopy decisions, the reply to ``precopy_round``
_XGS = {CONTINUE: 0, STOP: 1, ABORT: -1}
_UNKNOWN_US = (1 << 64) - 1
PAGE = 4096


@dataclass(frozen=True)
class Throttle:
    """Cap the guest's CPU at ``cap`` percent of one CPU (1-100; 100 lifts the
    throttle) and continue precopy."""

    cap: int


Decision = Union[str, Throttle]


@dataclass(frozen=True)
class RoundStats:
    round: int
    pages_sent: int
    pages_dirty: int
    dirty_rate: float            # pages/s, measured since the last round (0: not yet)
    bandwidth: float             # pages/s sent so far (0: not yet)
    predicted_downtime: Optional[float]   # seconds, None: unknown
    elapsed: float               # seconds since the first round began
    cap: int                     # the cap in force, percent of one CPU; 0: uncapped

    @classmethod
    def from_message(cls, msg: PrecopyRound, cap: int) -> "RoundStats":
        return cls(msg.iteration, msg.sent_pages, msg.dirty_pages, float(msg.dirty_rate),
                   float(msg.bandwidth),
                   None if msg.predicted_us == _UNKNOWN_US else msg.predicted_us / 1e6,
                   msg.elapsed_us / 1e6, cap)


Policy = Callable[[RoundStats], Union[Decision, Awaitable[Decision]]]


def target_policy(downtime_ms: float, *, max_rounds: int = 30, on_fail: str = "abort",
                  auto_converge: bool = False, converge_rounds: int = 5,
                  min_cap: int = 5, headroom: float = 0.5) -> Policy:
    """pyxl's downtime-target policy as a Python policy (see the module docstring).

    ``on_fail`` ("abort" | "stop"): what to do at ``max_rounds`` without a fit.
    With ``auto_converge`` the policy aims at ``headroom`` x the target: the
    prediction covers the memory copy only, and the switch-over's fixed costs
    (suspend, device state, the receiver's restore) come on top; a throttled
    guest gets there in a round or two more.
    """
    if not 0.001 <= downtime_ms <= 3600000:
        raise ValueError(f"downtime must be from 0.001 to 3600000 ms, not {downtime_ms}")
    if on_fail not in ("abort", "stop"):
        raise ValueError(f"on_fail must be 'abort' or 'stop', not {on_fail!r}")
    if not 1 <= min_cap <= 100 or converge_rounds < 1 or max_rounds < 1:
        raise ValueError("min_cap must be 1-100, converge_rounds and max_rounds positive")
    if not 0 < headroom <= 1:
        raise ValueError("headroom must be in (0, 1]")
    target = downtime_ms / 1e3 * (headroom if auto_converge else 1.0)

    def policy(s: RoundStats) -> Decision:
        if s.pages_dirty == 0 or (s.predicted_downtime is not None
                                  and s.predicted_downtime <= target):
            return STOP
        if s.round >= max_rounds:
            return ABORT if on_fail == "abort" else STOP
        if not auto_converge or s.round < 1 or s.bandwidth <= 0 or s.dirty_rate <= 0:
            return CONTINUE
        # Pages still dirty after n more rounds shrink by ratio r/B per round.
        ratio = s.dirty_rate / s.bandwidth
        goal = max(1.0, target * s.bandwidth)      # pages that go out within the target
        if s.pages_dirty <= goal:
            return CONTINUE
        needed = (goal / s.pages_dirty) ** (1.0 / converge_rounds)
        if ratio <= needed:
            return CONTINUE                         # converges in time by copying alone
        cap = s.cap or 100
        new = max(min_cap, cap // 2, int(math.floor(cap * needed / ratio)))
        return Throttle(new) if new < cap else CONTINUE

    return policy


class PolicyDriver:
    """Answers ``precopy_round`` for one migration (see the module docstring).

    ``fail(exc)`` is told once when the policy misbehaves or aborts; the helper
    is answered "abort" then, so libxc gives up with the guest still running.
    """

    def __init__(self, loop: Optional[Loop], backend: Any, domid: int, policy: Policy, *,
                 deadline: float, fail: Callable[[PrecopyPolicyError], None]) -> None:
        if not callable(policy):
            raise TypeError(f"policy: a function of RoundStats, not {type(policy).__name__}")
        if not deadline > 0:
            raise ValueError("policy_deadline must be positive")
        if not callable(getattr(backend, "set_cpu_cap", None)):
            raise ValueError(f"backend {getattr(backend, 'name', backend)!r} cannot cap a "
                             "domain's CPU (no set_cpu_cap), which a switch-over policy needs")
        self.loop, self.backend, self.domid = loop, backend, domid
        self.policy, self.deadline, self._fail = policy, deadline, fail
        self.logger = get_logger(f"pyxl.migrate.{domid}")
        self.original_cap: Optional[int] = None    # before our first throttle
        self.cap = 0                               # in force now (0: uncapped)
        #: every cap set, in order (the throttle used: the result reports it)
        self.caps: List[int] = []
        self.rounds: List[RoundStats] = []
        self._timer: Optional[Timer] = None
        self.failed = False

    # -- the callback handler (pyxl.ops.operation's Handler) --

    def __call__(self, req: Any) -> Optional[int]:
        stats = RoundStats.from_message(req.message, self.cap)
        self.rounds.append(stats)
        t0 = time.monotonic()
        try:
            answer = self.policy(stats)
        except Exception as exc:   # the toolstack's bug: a typed failure, the guest runs on
            return self._refuse(f"raised {exc!r} at round {stats.round}", exc)
        if inspect.isawaitable(answer):
            self._await(req, answer, stats)
            return None
        if time.monotonic() - t0 > self.deadline:
            return self._refuse(f"took {time.monotonic() - t0:.3f}s at round {stats.round}, "
                                f"over its {self.deadline:g}s deadline")
        return self._decide(answer, stats)

    def _await(self, req: Any, aw: Awaitable[Decision], stats: RoundStats) -> None:
        import asyncio
        task = asyncio.ensure_future(aw)

        def late() -> None:
            self._timer = None
            if not req.answered:
                task.cancel()
                req.reply(self._refuse(f"did not answer round {stats.round} within its "
                                       f"{self.deadline:g}s deadline"))

        def done(t: "asyncio.Future[Decision]") -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if req.answered or t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                req.reply(self._refuse(f"raised {exc!r} at round {stats.round}", exc))
            else:
                req.reply(self._decide(t.result(), stats))

        assert self.loop is not None
        self._timer = self.loop.call_later(self.deadline, late)
        task.add_done_callback(done)

    def _decide(self, answer: Any, stats: RoundStats) -> int:
        if isinstance(answer, Throttle):
            cap = answer.cap
            if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= 100:
                return self._refuse(f"answered {answer!r} at round {stats.round}: a throttle "
                                    "is a cap of 1-100 percent")
            try:
                self._set_cap(0 if cap == 100 else cap)
            except Exception as exc:
                return self._refuse(f"asked for {answer!r}, which the backend refused: {exc}",
                                    exc)
            self.logger.info("round %d: %.0f pages/s dirtied vs %.0f sent: CPU cap %d%%",
                             stats.round, stats.dirty_rate, stats.bandwidth, cap)
            return _XGS[CONTINUE]
        if isinstance(answer, str) and answer in _XGS:
            if answer == ABORT:
                self.failed = True
                self._fail(PrecopyPolicyError(f"the switch-over policy aborted the live "
                                              f"migration at round {stats.round}"))
            return _XGS[answer]
        return self._refuse(f"answered {answer!r} at round {stats.round}, not continue, "
                            "stop-and-copy, abort or a Throttle")

    def _refuse(self, why: str, cause: Optional[BaseException] = None) -> int:
        if not self.failed:
            self.failed = True
            err = PrecopyPolicyError(f"the switch-over policy {why}: the live migration "
                                     "was aborted, the guest keeps running")
            err.__cause__ = cause
            self._fail(err)
        return _XGS[ABORT]

    # -- the cap --

    def _set_cap(self, cap: int) -> None:
        if self.original_cap is None:
            self.original_cap = int(self.backend.cpu_cap(self.domid))
        self.backend.set_cpu_cap(self.domid, cap)
        self.cap = cap
        self.caps.append(cap)

    def restore(self) -> None:
        """Put the cap back as it was before the first throttle (idempotent; a
        domain that is gone -- migrated away and destroyed -- is fine)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.original_cap is None or self.cap == self.original_cap:
            return
        try:
            self.backend.set_cpu_cap(self.domid, self.original_cap)
            self.cap = self.original_cap
        except Exception as exc:
            if self.backend.state(self.domid) is not None:
                self.logger.error("could not restore domain %d's CPU cap %d%%: %s",
                                  self.domid, self.original_cap, exc)
