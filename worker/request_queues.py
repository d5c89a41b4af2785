"""The Scheduler's waiting and running orders, one object per policy.

`FcfsQueues`: arrival order, a preempted request back at the front.
`PriorityQueues`: (priority, arrival) order for both queues. Each keeps the
waiting deque/list and places requests into the scheduler's running list;
neither allocates blocks nor changes a request's status.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque

from shardline.worker.request import Request


class FcfsQueues:
    """Arrival order; a preempted request goes back to the front."""

    def __init__(self) -> None:
        self.waiting: deque[Request] = deque()

    def add_waiting(self, request: Request) -> None:
        self.waiting.append(request)

    def add_preempted(self, request: Request) -> None:
        self.waiting.appendleft(request)

    def add_running(self, running: list[Request], request: Request) -> None:
        running.append(request)   # the newest runs last, so it is preempted first

    def pop_waiting(self) -> Request:
        return self.waiting.popleft()

    def discard(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)


class PriorityQueues:
    """(priority, arrival) order for both queues: the lowest priority runs last and is preempted first."""

    def __init__(self) -> None:
        self.waiting: list[Request] = []
        self._admission = itertools.count()
        self._tiebreak: dict[str, int] = {}

    def _key(self, request: Request) -> tuple[int, float, int]:
        order = self._tiebreak.setdefault(request.request_id, next(self._admission))
        return request.priority, request.arrival_time, order

    def add_waiting(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=self._key)

    def add_preempted(self, request: Request) -> None:
        self.add_waiting(request)   # its key already puts it ahead of later arrivals

    def add_running(self, running: list[Request], request: Request) -> None:
        bisect.insort(running, request, key=self._key)

    def pop_waiting(self) -> Request:
        return self.waiting.pop(0)

    def discard(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        self._tiebreak.pop(request.request_id, None)
