"""The daemon's calls to the worker: one queue, a fixed pool of tasks, owned here.

After a transition commits, the supervisor queues the call the new state needs (open a session
on `initializing`, resume on `recovering`, close on `error`). A fixed number of tasks take calls
off the queue, so a thousand accounts entering `recovering` at once cost at most `concurrency`
requests in flight. A failed call is handed to ``on_failure``: the supervisor decides what it
means for the account (transient → the state's deadline and backoff; rejected → `fail`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from accountd.adapters.repository import AccountRepository
from accountd.adapters.worker import WorkerClient
from accountd.errors import WorkerRejected, WorkerTransient

log = logging.getLogger(__name__)

OPEN = "open"
RESUME = "resume"
CLOSE = "close"

OnFailure = Callable[[str, str, Exception], None]


class WorkerCalls:
    """A bounded pool of daemon → worker calls."""

    def __init__(
        self,
        worker: WorkerClient,
        repo: AccountRepository,
        on_failure: OnFailure,
        *,
        concurrency: int = 50,
    ) -> None:
        self.worker = worker
        self.repo = repo
        self.on_failure = on_failure
        self.concurrency = concurrency
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def queue(self, call: str, account_id: str) -> None:
        self._queue.put_nowait((call, account_id))

    @property
    def idle(self) -> bool:
        """Nothing queued (calls may still be running)."""
        return self._queue.empty()

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    async def start(self) -> None:
        for i in range(self.concurrency):
            self._tasks.append(asyncio.create_task(self._loop(), name=f"accountd-worker-call-{i}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        # gather, not `suppress(CancelledError)` around each await: that also swallowed a
        # cancellation of stop() itself.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _loop(self) -> None:
        task = asyncio.current_task()
        while True:
            call, account_id = await self._queue.get()
            try:
                await self._call(call, account_id)
            except (WorkerTransient, WorkerRejected) as exc:
                self.on_failure(call, account_id, exc)
            except Exception:  # boundary: one bad call must not kill the pool
                log.exception("worker call %s for %s failed", call, account_id)
            # A cancellation can come back as an ordinary error: when `stop` cancels a call
            # just as its aiohttp timeout fires, aiohttp may turn the CancelledError into a
            # TimeoutError (→ WorkerTransient above). The request is still on the task: honour
            # it, or the loop waits on the queue forever and `stop` with it (seen in CI: SIGINT
            # right after start-up, the daemon still running 20 s later).
            if task is not None and task.cancelling():
                raise asyncio.CancelledError

    async def _call(self, call: str, account_id: str) -> None:
        if call == OPEN:
            info = await self.repo.session_info(account_id)
            if info is None:
                return
            await self.worker.open_session(
                account_id=info.account_id,
                wework_guid=info.wework_guid,
                corp_id=info.corp_id,
                device_info=info.device_info,
                proxy_config=info.proxy_config,
            )
        elif call == RESUME:
            await self.worker.resume_session(account_id)
        elif call == CLOSE:
            await self.worker.close_session(account_id)
