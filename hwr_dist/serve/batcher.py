"""Dynamic batching: requests that arrive together share one forward pass.

A request's characters wait in a queue. The batching task takes the first and, while the batch
is not full and requests are still being preprocessed (so more are about to join), waits at most
`max_wait_ms` for them; then it runs the batch (at most `max_batch` images) on one inference
thread, off the event loop. A lone request is not held back: with nothing else in preprocessing
there is nothing to wait for. `max_batch=1` is per-request inference.
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch


class Batcher:
    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_ms: float,
                 on_batch: Callable[[int], None] = lambda n: None):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be at least 1 and max_wait_ms not negative")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: collections.deque[tuple[torch.Tensor, asyncio.Future]] = collections.deque()
        self._queued = 0  # images in the queue
        self._expected = 0  # requests announced (being preprocessed) but not yet submitted
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        # One thread: forward passes run one after another, each using torch's own intra-op threads.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hwr-infer")
        self._closing = False
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="hwr-batcher")

    async def stop(self) -> None:
        """Answer everything already queued, then stop."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def announce(self) -> None:
        """A request started preprocessing: its characters will be submitted (or `withdraw` is called)."""
        self._expected += 1

    def withdraw(self) -> None:
        self._expected = max(0, self._expected - 1)

    async def submit(self, images: torch.Tensor, announced: bool = True) -> torch.Tensor:
        """Probabilities for uint8 [K, 28, 28]; more than max_batch images are split into several batches."""
        if announced:
            self.withdraw()
        if self._closing or self._task is None:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        futures = []
        for chunk in images.split(self.max_batch) if len(images) > self.max_batch else (images,):
            fut = loop.create_future()
            self._queue.append((chunk, fut))
            self._queued += len(chunk)
            futures.append(fut)
        self._wake.set()
        if len(futures) == 1:
            return await futures[0]
        return torch.cat(await asyncio.gather(*futures))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = loop.time() + self.max_wait
            while self._queued < self.max_batch and self._expected > 0 and not self._closing:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            await self._run_batch(self._take(), loop)

    def _take(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        batch, n = [], 0
        while self._queue and n + len(self._queue[0][0]) <= self.max_batch:
            images, fut = self._queue.popleft()
            n += len(images)
            batch.append((images, fut))
        self._queued -= n
        return batch

    async def _run_batch(self, batch: list[tuple[torch.Tensor, asyncio.Future]], loop) -> None:
        images = torch.cat([x for x, _ in batch]) if len(batch) > 1 else batch[0][0]
        try:
            probs = await loop.run_in_executor(self._executor, self.run, images)
        except Exception as e:  # noqa: BLE001 - every waiting request hears of the failure
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        self.on_batch(len(images))
        start = 0
        for x, fut in batch:
            if not fut.done():  # a client that went away leaves a cancelled future
                fut.set_result(probs[start:start + len(x)])
            start += len(x)
