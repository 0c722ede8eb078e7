"""Test accuracy of the parent model on the held-out split, measured by the server.

Workers never evaluate on their own shards: the figure that matters is the
parent model's on data no worker trains on. Evaluations run on a copy of the
parameters in a background thread, so pushes are not held up while it computes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradhub.data import Splits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    version: int
    test_loss: float
    test_accuracy: float


class Evaluator:
    def __init__(self, model: nn.Module, splits: Splits, batch_size: int = 1000) -> None:
        self._model = model
        self._x = splits.x_test
        self._y = splits.y_test
        self._batch = batch_size

    @torch.no_grad()
    def evaluate(self, version: int, parameters: list[torch.Tensor]) -> Evaluation:
        for param, value in zip(self._model.parameters(), parameters):
            param.copy_(value)
        self._model.eval()
        total_loss, correct = 0.0, 0
        for start in range(0, len(self._y), self._batch):
            x = self._x[start : start + self._batch]
            y = self._y[start : start + self._batch]
            logits = self._model(x)
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
        n = len(self._y)
        return Evaluation(version=version, test_loss=total_loss / n, test_accuracy=correct / n)


class BackgroundEvaluator:
    """Evaluates requested versions one at a time; drops requests while busy (keeps the newest)."""

    def __init__(
        self,
        evaluator: Evaluator,
        parameters: Callable[[], tuple[int, list[torch.Tensor]]],
        on_result: Callable[[Evaluation], None],
    ) -> None:
        self._evaluator = evaluator
        self._parameters = parameters
        self._on_result = on_result
        self._requests: queue.Queue[bool] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()  # one evaluation at a time (the model copy is shared)
        self._thread = threading.Thread(target=self._run, name="evaluator", daemon=True)
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def request(self) -> None:
        try:
            self._requests.put_nowait(True)
        except queue.Full:
            pass  # one is already waiting; it will see the newest parameters

    def evaluate_now(self) -> Evaluation:
        with self._lock:
            version, params = self._parameters()
            result = self._evaluator.evaluate(version, params)
        self._on_result(result)
        return result

    def stop(self) -> None:
        self._stopped = True
        try:
            self._requests.put_nowait(False)
        except queue.Full:
            pass
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            keep_going = self._requests.get()
            if not keep_going or self._stopped:
                return
            try:
                self.evaluate_now()
            except Exception:  # an evaluation failure must not stop training
                log.exception("evaluation failed")
