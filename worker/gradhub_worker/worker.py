"""The worker process: register, pull, train on its shard, push, until the run finishes.

A worker never hangs on a dead peer: every call has a deadline, failures are
retried with backoff, and after `give_up_after` seconds without a successful
exchange with the server the worker exits with an error.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradhub import wire
from gradhub.codecs import codec_from_name
from gradhub.config import RunConfig, compact_indices_of, momentum_on_workers, pull_delta_of, pull_dtype_of
from gradhub.coordination import Lease, RunCoordinator
from gradhub.data import load_dataset, shard_indices
from gradhub.delays import StepDelay
from gradhub.domain import ParameterSnapshot, PushMeta, PushResult
from gradhub.encoded import WIRE_DTYPES, EncodedTensor
from gradhub.errors import (
    CoordinationError,
    DuplicatePush,
    InvalidRequest,
    NoFreeRank,
    NonFiniteGradient,
    RedisUnavailable,
    RunFinished,
    ServerBusy,
    ServerUnavailable,
    StalePush,
    UnknownWorker,
    VersionNotReached,
)
from gradhub.models import build_model, count_parameters
from gradhub.retry import Backoff, Deadline, wait_for
from gradhub.tls import ClientTls
from gradhub_worker.ack_log import AckLog
from gradhub_worker.client import ParameterClient
from gradhub_worker.error_feedback import ErrorFeedback, FeedbackOptions
from gradhub_worker.lease import LeaseKeeper
from gradhub_worker.loading import ModelLoader

log = logging.getLogger(__name__)

T = TypeVar("T")


#: Consecutive non-finite local gradients after which a worker reports the run diverged.
DIVERGED_AFTER = 10
#: How often a worker that reported divergence looks for the server's verdict.
DIVERGED_POLL_S = 0.2


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str
    run_id: str
    worker_id: str
    #: Server address; when None it is read from Redis.
    server: str | None = None
    device: str = "auto"
    loader_workers: int = 0
    cache_dir: Path | None = None
    #: How long to wait for the run's config, the server's address, and a free rank.
    join_timeout: float = 60.0
    #: Deadline of one push (a sync push waits for the whole barrier) or pull.
    rpc_timeout: float = 60.0
    #: Exit with an error after this long without a successful exchange with the server.
    give_up_after: float = 60.0
    #: A fixed rank (Kubernetes Indexed Job: the completion index); None takes the lowest free one.
    rank: int | None = None
    #: The run's shared token (gradhub.auth), sent with every call; None: the server has none.
    auth_token: str | None = None
    #: TLS to the server (its CA, and this worker's certificate for mutual TLS); None: plaintext.
    tls: ClientTls | None = None
    #: Append every acknowledged push here (gradhub_worker/ack_log.py); None: no record.
    ack_log: Path | None = None


#: Room for a message's header (names, shapes, specs) beside the parameters' bytes.
ONE_MESSAGE_SLACK = 64 << 10

#: A registration's sequence numbers start at its fencing token << SEQ_EPOCH_BITS: fencing
#: tokens only grow, so a restarted worker that keeps its id (a Kubernetes pod's name) never
#: reuses a number its earlier life sent, and the server's receipts stay exact.
SEQ_EPOCH_BITS = 32


def next_seq(previous: int, token: int) -> int:
    return max(previous + 1, (token << SEQ_EPOCH_BITS) + 1)


def feedback_for(config: RunConfig, rank: int) -> ErrorFeedback:
    """Error feedback around the run's codec, with the DGC options the run asks for."""
    on_workers = momentum_on_workers(config)
    return ErrorFeedback(
        codec_from_name(config.compression, seed=config.seed * 7919 + rank, dense_below=config.dense_below,
                        compact_indices=compact_indices_of(config)),
        FeedbackOptions(
            momentum=config.momentum if on_workers else 0.0,
            weight_decay=config.weight_decay if on_workers else 0.0,
            masking=config.momentum_masking,
            clip_norm=config.clip_norm,
            warmup_versions=config.sparsity_warmup,
        ),
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ServerUnavailable(f"device {name} requested but CUDA is not available")
    return device


class ShardBatches:
    """Endless shuffled batches of one rank's shard; each epoch reshuffles (seeded).

    With `loader_workers` > 0 a DataLoader with that many worker processes produces the
    batches; with 0 the shard (already in memory) is indexed directly, which costs a
    tenth of the DataLoader's per-sample collation on every step.
    """

    def __init__(
        self, config: RunConfig, rank: int, device: torch.device, loader_workers: int,
        cache_dir: Path | None,
    ) -> None:
        splits = load_dataset(config.dataset, cache_dir)
        indices = shard_indices(len(splits.y_train), rank, config.workers)
        self._x, self._y = splits.x_train[indices], splits.y_train[indices]
        self.size = len(self._y)
        self._batch = min(config.batch_size, self.size)
        self._generator = torch.Generator().manual_seed(config.seed * 7919 + rank)
        self._device = device
        self._order = torch.empty(0, dtype=torch.int64)
        self._position = 0
        self._loader: DataLoader[tuple[torch.Tensor, ...]] | None = None
        if loader_workers > 0:
            self._loader = DataLoader(
                TensorDataset(self._x, self._y),
                batch_size=self._batch,
                shuffle=True,
                drop_last=True,
                num_workers=loader_workers,
                generator=self._generator,
                persistent_workers=True,
                pin_memory=device.type == "cuda",
            )
            self._iterator: Iterator[list[torch.Tensor]] = iter(self._loader)
        else:
            # Small in-memory shards move to the device once, not every step.
            self._x, self._y = self._x.to(device), self._y.to(device)

    def _from_memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._position + self._batch > len(self._order):
            self._order = torch.randperm(self.size, generator=self._generator)
            self._position = 0
        batch = self._order[self._position : self._position + self._batch].to(self._device)
        self._position += self._batch
        return self._x[batch], self._y[batch]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, on the worker's device."""
        if self._loader is None:
            return self._from_memory()
        try:
            x, y = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self._loader)
            x, y = next(self._iterator)
        non_blocking = self._device.type == "cuda"  # pinned by the DataLoader
        return x.to(self._device, non_blocking=non_blocking), y.to(self._device, non_blocking=non_blocking)


@dataclass(frozen=True)
class _Loop:
    """What every step of a training loop works with."""

    config: RunConfig
    model: nn.Module
    loaded: ModelLoader
    batches: ShardBatches
    client: ParameterClient
    keeper: LeaseKeeper
    feedback: ErrorFeedback
    delay: StepDelay

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [p for _, p in self.loaded.named]


@dataclass(frozen=True)
class _LocalGradient:
    """One batch's gradients, with the version of the parameters they were computed on."""

    gradients: list[tuple[str, torch.Tensor]]
    version: int
    loss: float
    samples: int


class Worker:
    def __init__(self, settings: WorkerSettings, coordinator: RunCoordinator | None = None) -> None:
        self.settings = settings
        self.coordinator = coordinator or RunCoordinator.from_url(settings.redis_url, settings.run_id)
        self.pushes_applied = 0
        self.pushes_refused = 0
        self.pushes_retried = 0
        self._pull_dtype = torch.float32
        self._pull_delta = False
        #: The connection in use: replaced when the server comes back at another address.
        self._client: ParameterClient | None = None
        #: Loads pulled parameters into the model and knows the version it holds (set by `run`).
        self._model: ModelLoader | None = None
        self._acks = AckLog(settings.ack_log) if settings.ack_log is not None else None
        #: The last push's sequence number (see next_seq).
        self._seq = 0
        self._non_finite_steps = 0
        self._last_log = 0.0

    def run(self) -> int:
        s = self.settings
        config = self.coordinator.wait_config(s.join_timeout)
        device = pick_device(s.device)
        torch.manual_seed(config.seed)
        model = build_model(config.model, config.model_kwargs).to(device)
        self._model = loader = ModelLoader(model)
        lease = self.coordinator.register(
            s.worker_id, config.workers, config.lease_seconds, s.join_timeout, s.rank
        )
        keeper = LeaseKeeper(self.coordinator, lease, config.lease_seconds)
        keeper.start()
        client: ParameterClient | None = None
        try:
            # Before any gRPC channel exists: DataLoader workers fork here, and a fork while
            # gRPC's threads run is unsafe.
            batches = ShardBatches(config, lease.rank, device, s.loader_workers, s.cache_dir)
            address = s.server or self.coordinator.wait_server(s.join_timeout)
            log.info("worker %s: rank %d of %d (%d samples), server %s, device %s",
                     s.worker_id, lease.rank, config.workers, batches.size, address, device)
            parameters = count_parameters(model)
            client = ParameterClient(
                address, config.run_id, s.worker_id,
                max_payload_bytes=12 * parameters + (1 << 16), token=s.auth_token, tls=s.tls,
                one_message_steps=4 * parameters + ONE_MESSAGE_SLACK <= wire.CHUNK_BYTES,
                pinned=device.type == "cuda",
            )
            return self._train(config, model, loader, batches, self._wait_ready(client, s.join_timeout), keeper)
        finally:
            keeper.stop()
            try:
                self.coordinator.release(keeper.lease)
            except Exception as exc:  # leaving is best effort: the lease expires anyway
                log.warning("could not release lease: %s", exc)
            if self._client is not None:
                self._client.close()
            if client is not None and client is not self._client:
                client.close()

    def _train(
        self, config: RunConfig, model: nn.Module, loaded: ModelLoader, batches: ShardBatches,
        client: ParameterClient, keeper: LeaseKeeper,
    ) -> int:
        feedback = feedback_for(config, keeper.lease.rank)
        delay = StepDelay(config.delay, config.slowdown, config.seed, keeper.lease.rank, config.workers)
        if delay.active:
            log.info("injected delay %s, slowdown x%g", config.delay, delay.factor)
        self._non_finite_steps = 0
        self._pull_dtype = WIRE_DTYPES[pull_dtype_of(config)]
        self._pull_delta = pull_delta_of(config)
        self._last_log = started = time.monotonic()
        loop = _Loop(config, model, loaded, batches, client, keeper, feedback, delay)
        try:
            if config.overlap:
                log.info("overlap: each gradient is computed while the previous push is in flight")
                self._train_overlapped(loop)
            else:
                self._train_in_turn(loop)
        except RunFinished as exc:
            log.info("%s", exc)
        log.info("run finished: %d pushes applied, %d refused in %.1fs",
                 self.pushes_applied, self.pushes_refused, time.monotonic() - started)
        return 0

    def _train_in_turn(self, loop: _Loop) -> None:
        """Pull, compute, push; the next gradient starts from the parameters the push
        brought back."""
        snapshot = self._pull(loop.client, 0)
        while not snapshot.finished:
            if loop.keeper.lost.is_set():
                loop.keeper.replace(self._reregister(loop.config, loop.keeper.lease))
            computing = time.monotonic()
            loop.loaded.load(snapshot)
            local = self._compute(loop, snapshot.version)
            try:
                encoded = loop.feedback.encode(local.gradients, loop.parameters, local.version)
            except NonFiniteGradient as exc:
                snapshot = self._non_finite(loop.client, loop.feedback, snapshot, exc)
                continue
            self._non_finite_steps = 0
            self._straggle(loop.delay, computing)
            snapshot = self._step(loop.client, self._meta(loop, local), encoded, loop.feedback, loop.keeper,
                                  loop.config)
            self._log_progress(snapshot, local.loss)

    def _train_overlapped(self, loop: _Loop) -> None:
        """Compute the next gradient while the last push (and the pull it brings back) is in
        flight, on one sender thread: the transfer hides behind the compute, and every push
        is computed on the parameters from before the previous push's answer.

        Only the sender thread touches the residuals while a push is in flight (a refused
        push goes back to them), and only the main thread after: it encodes the next
        gradient once the answer is in, and then loads the parameters the answer carried.
        """
        snapshot = self._pull(loop.client, 0)
        loop.loaded.load(snapshot)
        sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradhub-push")
        try:
            in_flight: Future[ParameterSnapshot] | None = None
            while not snapshot.finished:
                computing = time.monotonic()
                local = self._compute(loop, loop.loaded.held or 0)
                self._straggle(loop.delay, computing)  # injected compute time: overlapped too
                if in_flight is not None:
                    snapshot = in_flight.result()  # the end of the run, or no server for good, raises here
                    in_flight = None
                    if snapshot.finished:
                        break
                if loop.keeper.lost.is_set():
                    loop.keeper.replace(self._reregister(loop.config, loop.keeper.lease))
                try:
                    # Before the new parameters load: weight decay takes the gradient's own.
                    encoded = loop.feedback.encode(local.gradients, loop.parameters, local.version)
                except NonFiniteGradient as exc:
                    snapshot = self._non_finite(loop.client, loop.feedback, snapshot, exc)
                    loop.loaded.load(snapshot)
                    continue
                self._non_finite_steps = 0
                meta = self._meta(loop, local)
                loop.loaded.load(snapshot)
                in_flight = sender.submit(self._step, loop.client, meta, encoded, loop.feedback, loop.keeper,
                                          loop.config)
                self._log_progress(snapshot, local.loss)
        finally:
            # Nothing is in flight after a normal end; after an error, whatever is in
            # flight is not waited for (the channel closes under it as the worker leaves).
            sender.shutdown(wait=False, cancel_futures=True)

    def _compute(self, loop: _Loop, version: int) -> _LocalGradient:
        x, y = loop.batches.next()
        loop.model.zero_grad(set_to_none=True)  # fresh tensors: an encode still to come keeps its own
        loss = nn.functional.cross_entropy(loop.model(x), y)
        loss.backward()
        gradients = [(n, p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in loop.loaded.named]
        return _LocalGradient(gradients, version, loss.item(), int(y.numel()))

    def _meta(self, loop: _Loop, local: _LocalGradient) -> PushMeta:
        self._seq = next_seq(self._seq, loop.keeper.lease.token)
        return PushMeta(
            run_id=loop.config.run_id, worker_id=self.settings.worker_id, seq=self._seq,
            base_version=local.version, loss=local.loss, samples=local.samples,
            pull_dtype=self._pull_dtype, pull_delta=self._pull_delta,
        )

    @staticmethod
    def _straggle(delay: StepDelay, computing: float) -> None:
        if delay.active:
            # The injected straggling itself (a lab feature), not synchronisation.
            time.sleep(delay.idle_seconds(time.monotonic() - computing))

    def _log_progress(self, snapshot: ParameterSnapshot, loss: float) -> None:
        now = time.monotonic()
        if now - self._last_log > 10:
            self._last_log = now
            log.info("version %d: %d pushes applied, %d refused, loss %.4f",
                     snapshot.version, self.pushes_applied, self.pushes_refused, loss)

    def _non_finite(
        self, client: ParameterClient, feedback: ErrorFeedback, snapshot: ParameterSnapshot,
        exc: NonFiniteGradient,
    ) -> ParameterSnapshot:
        """A non-finite local gradient: dropped with the residual. Once it persists for
        DIVERGED_AFTER steps, training diverged: say so, and the server ends the run."""
        feedback.reset()
        self._non_finite_steps += 1
        self.pushes_refused += 1
        if self._non_finite_steps == DIVERGED_AFTER:
            log.error("training diverged: %d non-finite gradients in a row at version %d (%s)",
                      self._non_finite_steps, snapshot.version, exc)
            try:
                self.coordinator.report_diverged(self.settings.worker_id, snapshot.version, str(exc))
            except CoordinationError as error:
                log.warning("could not report divergence: %s", error)
        elif self._non_finite_steps < DIVERGED_AFTER:
            log.warning("non-finite gradient at version %d dropped: %s", snapshot.version, exc)
        state = self._run_state()
        if state in ("finished", "interrupted", "diverged"):
            raise RunFinished(f"the run is {state}; leaving")
        if self._non_finite_steps >= DIVERGED_AFTER:
            time.sleep(DIVERGED_POLL_S)  # waiting for the server to end the run, not racing it
        return self._pull(client, 0)

    def _step(
        self, client: ParameterClient, meta: PushMeta, encoded: Sequence[EncodedTensor],
        feedback: ErrorFeedback, keeper: LeaseKeeper, config: RunConfig,
    ) -> ParameterSnapshot:
        """Push and receive the next parameters in one call; a refused push goes back to the
        residual and the parameters are pulled. Raises RunFinished when the run is over."""
        try:
            result, snapshot = self._push_until_answered(client, meta, encoded)
            self.pushes_applied += 1
            if self._acks is not None:
                self._acks.record(meta.worker_id, meta.seq, result.version)
            if snapshot is None:  # SSP held it back, or too big for one Step message: pull
                return self._pull(client, result.version)
            return snapshot
        except DuplicatePush as exc:
            # Only a copy older than this worker's last push gets this: another process is
            # pushing under the same worker id. This push was not applied.
            log.error("%s", exc)
            feedback.restore(encoded)
            self.pushes_refused += 1
        except StalePush as exc:
            log.debug("stale push: %s", exc)
            feedback.restore(encoded)
            self.pushes_refused += 1
        except UnknownWorker as exc:
            log.warning("%s", exc)
            feedback.restore(encoded)
            keeper.replace(self._reregister(config, keeper.lease))
        except InvalidRequest as exc:
            # The server found NaN/Inf (divergence) or a malformed gradient: drop it, and
            # drop the residual too, or the NaN would poison every later push.
            log.error("gradient dropped, error feedback reset: %s", exc)
            feedback.reset()
            self.pushes_refused += 1
        return self._pull(client, 0)

    def _push_until_answered(
        self, client: ParameterClient, meta: PushMeta, encoded: Sequence[EncodedTensor]
    ) -> tuple[PushResult, ParameterSnapshot | None]:
        """Send the push until the server answers it, always under the same sequence number.

        No answer (a deadline, a dropped connection, a server stopping) does not mean not
        applied: the server keeps the first copy's outcome and answers retries with it
        (exactly once, gradhub_server/receipts.py). So the gradient goes back to the
        residual only on a refusal, never on silence.
        """

        def retried() -> None:
            self.pushes_retried += 1

        return self._until_answered(
            lambda current: current.push_pull(meta, encoded, self.settings.rpc_timeout),
            f"push seq {meta.seq}", client, retried,
        )

    def _pull(self, client: ParameterClient, min_version: int) -> ParameterSnapshot:
        return self._until_answered(
            lambda current: current.pull(
                min_version, self.settings.rpc_timeout, self._pull_dtype,
                self._model.held if self._pull_delta and self._model is not None else None,
            ),
            "pull", client,
        )

    def _until_answered(
        self, call: Callable[[ParameterClient], T], what: str, client: ParameterClient,
        on_retry: Callable[[], None] | None = None,
    ) -> T:
        """`call` again with backoff while the server gives no answer (unreachable, busy,
        a deadline); give up after `give_up_after` seconds of that.

        Raises RunFinished when the server is gone because the run ended or was stopped:
        no point waiting for it.
        """
        if self._client is None:
            self._client = client
        backoff = Backoff(initial=0.05, maximum=2.0)
        first_failure: float | None = None
        while True:
            try:
                return call(self._client)
            except (ServerUnavailable, VersionNotReached, ServerBusy) as exc:
                state = self._run_state()
                if state in ("finished", "interrupted", "diverged"):
                    raise RunFinished(f"the run is {state}; leaving") from exc
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure > self.settings.give_up_after:
                    raise ServerUnavailable(
                        f"{what}: no answer from server {self._client.address} for {now - first_failure:.0f}s: {exc}"
                    ) from exc
                delay = backoff.next_delay()
                if on_retry is not None:
                    on_retry()
                log.warning("%s got no answer (%s); trying again in %.2fs", what, exc, delay)
                self._follow_server()
                time.sleep(delay)

    def _wait_ready(self, client: ParameterClient, timeout: float) -> ParameterClient:
        """The first contact, following the address in Redis while waiting: the server may
        have been replaced between reading its address and connecting to it."""
        deadline = Deadline(timeout)
        self._client = client
        while True:
            current = self._client or client
            try:
                current.wait_ready(max(0.05, min(1.0, deadline.remaining())))
                return current
            except ServerUnavailable:
                if deadline.expired():
                    raise ServerUnavailable(f"server {current.address} not reachable within {timeout:g}s") from None
                self._follow_server()

    def _follow_server(self) -> None:
        """A server restarted elsewhere (a new port or host) publishes its new address in
        Redis: connect there. The same push goes again under the same sequence number."""
        current = self._client
        if self.settings.server is not None or current is None:
            return  # an address given by the user (a stable DNS name) is kept
        try:
            address = self.coordinator.server_address()
        except CoordinationError:
            return
        if address is None or address == current.address:
            return
        log.warning("server moved from %s to %s (restarted?): reconnecting", current.address, address)
        self._client = current.reconnected(address)
        current.close()

    def _run_state(self) -> str | None:
        try:
            status = self.coordinator.read_status()
        except CoordinationError:
            return None
        return None if status is None else status.get("state")

    def _reregister(self, config: RunConfig, old: Lease) -> Lease:
        try:
            self.coordinator.release(old)
        except Exception:
            pass
        s = self.settings
        # Keep the old rank (and data shard) when it is free: after a Redis restart every
        # lease is gone at once, and each worker should find its own rank again.
        preferred = s.rank if s.rank is not None else old.rank

        def attempt() -> Lease | None:
            try:
                lease = self.coordinator.try_register(s.worker_id, config.workers, config.lease_seconds, preferred)
                if lease is None and s.rank is None:
                    lease = self.coordinator.try_register(s.worker_id, config.workers, config.lease_seconds)
                return lease
            except RedisUnavailable as exc:  # Redis restarting: wait for it like for a free rank
                log.warning("re-registering: %s", exc)
                return None

        lease = wait_for(attempt, s.join_timeout, f"a rank in run {config.run_id}",
                         backoff=Backoff(initial=0.05, maximum=1.0), on_timeout=NoFreeRank)
        log.info("re-registered with rank %d (was %d)", lease.rank, old.rank)
        return lease

