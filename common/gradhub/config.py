"""The run's configuration: written once to Redis, read by every process of the run.

Only what every process must agree on lives here (mode, model, optimizer, codec,
batch size, seed, lease length). Per-process settings (bind address, output
folder, device) are flags of the process that needs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from gradhub.codecs import parse_codec
from gradhub.delays import parse_delay, parse_slowdown
from gradhub.errors import ConfigurationError
from gradhub.index_coding import INDEX_CODINGS

MODES = ("sync", "ssp", "async", "async-sa", "dc-asgd")
#: Modes that apply each push on arrival (staleness is tracked and bounded).
ASYNC_MODES = ("ssp", "async", "async-sa", "dc-asgd")
OPTIMIZERS = ("sgd", "adam")
#: How workers pull: whole or only what changed since the version they hold, fp32 or fp16.
PULL_COMPRESSIONS = ("none", "fp16", "delta", "delta+fp16")
LR_SCHEDULES = ("constant", "step", "cosine")

#: Defaults that depend on the mode, measured on MNIST-1D with the default CNN
#: (see README, "Figures"). Async applies every push alone (batch 50, not 100) and
#: its staleness already acts like extra momentum, so it takes a smaller step, more often.
MODE_DEFAULTS: dict[str, dict[str, float | int]] = {
    "sync": {"steps": 3000, "lr": 0.1},
    "async": {"steps": 9000, "lr": 0.03},
    # Staleness-aware async divides the rate by each push's staleness, from the same start;
    # SSP and DC-ASGD are async with a bound or a correction, from the same start too.
    "async-sa": {"steps": 9000, "lr": 0.03},
    "ssp": {"steps": 9000, "lr": 0.03},
    "dc-asgd": {"steps": 9000, "lr": 0.03},
}


def async_default_lr(workers: int) -> float:
    """The async modes' default rate. With more workers the staleness grows and, with the
    server's momentum 0.9, acts as extra momentum: at 4 workers lr 0.03 collapsed to chance
    in 2 of 3 seeds and 0.0225 in 1 of 3, while 0.015 reached 93.5-94.2 % in 3 of 3 (README,
    "Staleness lab"). At 3 workers 0.03 collapsed in 2 of 9 default runs. 0.02 ended at
    91.6-95.5 % in 33 runs here, but one CI run ended at 69.4 %, and 6 of 10 runs on
    2026-12-06 fell below 85 % for a while in their second half (to 36.9 % once); 0.015 fell
    to 82.7 % at worst in 8 runs and ended at 91.9-95.1 %. So 0.03 up to 2 workers, 0.015 at
    3 and 4, 0.06 / workers beyond."""
    return 0.03 if workers <= 2 else 0.06 / max(4, workers)


def new_run_id(mode: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{mode}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class RunConfig:
    run_id: str
    mode: str = "sync"
    #: World size: how many ranks (data shards) the run has.
    workers: int = 2
    #: Server updates to make (model versions); in sync mode one per barrier step.
    steps: int = 3000
    #: A built-in model name or `module:function`.
    model: str = "cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "mnist1d"
    optimizer: str = "sgd"
    lr: float = 0.1
    #: constant | step (x0.1 for the last quarter) | cosine, over `steps`.
    lr_schedule: str = "step"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: Gradient codec name (see gradhub.codecs): none | fp16 | bf16 | int8 | topk:R[+V] | ...
    compression: str = "fp16"
    #: DGC momentum correction: workers keep momentum (and weight decay) and push their
    #: accumulated velocity; the server takes plain SGD steps. auto: on for sparsifying codecs.
    momentum_correction: str = "auto"
    #: Sparsifying codecs send tensors of fewer elements than this whole.
    dense_below: int = 4096
    #: DGC momentum factor masking: zero the momentum of coordinates just sent. Off by
    #: default: on the wide model it cost a point of accuracy (README, "Compression").
    momentum_masking: bool = False
    #: Local gradient clipping: each worker scales its gradient to at most this L2 norm (0: off).
    clip_norm: float = 0.0
    #: Sparsity warm-up: over the first N versions the kept fraction falls exponentially
    #: from 25 % to the codec's ratio (0: off).
    sparsity_warmup: int = 0
    #: Pulls: none (whole, fp32), fp16 (whole), delta (what changed since the worker's
    #: version, fp32: exact), delta+fp16. A delta is never larger than the whole.
    pull_compression: str = "delta"
    #: Sparse indices on the wire: fast (raw int32) or compact (the smallest of raw, delta
    #: varints and a bitmap: fewer bytes, more CPU; for slow links). See index_coding.
    index_coding: str = "fast"
    #: Async only: a push staler than this many versions is refused.
    max_staleness: int = 16
    #: SSP only: a worker more than this many pushes ahead of the slowest live worker
    #: waits at its pull (Ho et al. 2013).
    ssp_bound: int = 3
    #: DC-ASGD only: the variance-control factor lambda_0 of the adaptive variant
    #: (Zheng et al. 2017): lambda_t = lambda_0 / sqrt(mean square of the gradient).
    dc_lambda: float = 2.0
    #: Artificial staleness tau (async modes): the server applies each push tau pushes
    #: after it arrived, so with one worker every gradient is exactly tau versions stale.
    inject_staleness: int = 0
    #: Async modes: a worker computes its next gradient while its previous push is in
    #: flight (one more version of staleness per push, the transfer hidden behind compute).
    overlap: bool = False
    #: Injected delay per worker step, seeded by (seed, rank): none | constant:MS |
    #: exponential:MEAN_MS | lognormal:MEDIAN_MS:SIGMA | pareto:SCALE_MS:ALPHA.
    delay: str = "none"
    #: Per-rank slowdown factors, e.g. "0:3" (rank 0 takes 3x as long per step).
    slowdown: str = ""
    #: Sync only: backup workers (Chen et al. 2016). A step goes ahead once all but this
    #: many live workers have pushed; the pushes that come later for it are dropped.
    backup_workers: int = 0
    #: Samples per worker per step.
    batch_size: int = 50
    seed: int = 0
    #: Evaluate the parent model on the held-out split every this many versions.
    eval_every: int = 100
    #: A worker that has not renewed its lease for this long is dead to the run.
    lease_seconds: float = 3.0

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("workers", "steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.momentum_correction not in ("auto", "on", "off"):
            problems.append(f"momentum_correction must be auto, on or off, got {self.momentum_correction!r}")
        elif self.momentum_correction == "on" and self.optimizer != "sgd":
            problems.append("momentum correction needs optimizer sgd")
        if self.index_coding not in INDEX_CODINGS:
            problems.append(f"index_coding must be one of {INDEX_CODINGS}, got {self.index_coding!r}")
        if self.pull_compression not in PULL_COMPRESSIONS:
            problems.append(f"pull_compression must be one of {PULL_COMPRESSIONS}, got {self.pull_compression!r}")
        if self.clip_norm < 0 or self.sparsity_warmup < 0 or self.dense_below < 0:
            problems.append("clip_norm, sparsity_warmup and dense_below must be >= 0")
        try:
            parse_codec(self.compression)
        except ConfigurationError as exc:
            problems.append(str(exc))
        if not 0 <= self.backup_workers < self.workers:
            problems.append(f"backup_workers must be >= 0 and below workers ({self.workers}), "
                            f"got {self.backup_workers}")
        elif self.backup_workers and self.mode != "sync":
            problems.append("backup_workers applies to mode sync only")
        if self.ssp_bound < 0 or self.inject_staleness < 0:
            problems.append("ssp_bound and inject_staleness must be >= 0")
        if self.inject_staleness and self.mode not in ASYNC_MODES:
            problems.append(f"inject_staleness applies to the async modes {ASYNC_MODES}, not {self.mode}")
        if self.overlap and self.mode not in ASYNC_MODES:
            problems.append(f"overlap applies to the async modes {ASYNC_MODES}, not {self.mode}: a sync "
                            "step waits for every gradient computed on its own version")
        if self.inject_staleness > self.max_staleness:
            problems.append(f"inject_staleness ({self.inject_staleness}) exceeds max_staleness "
                            f"({self.max_staleness}): every push would be refused; raise --max-staleness")
        if not self.dc_lambda >= 0:
            problems.append(f"dc_lambda must be >= 0, got {self.dc_lambda}")
        try:
            parse_delay(self.delay)
            parse_slowdown(self.slowdown, self.workers)
        except ConfigurationError as exc:
            problems.append(str(exc))
        if self.max_staleness < 0:
            problems.append(f"max_staleness must be >= 0, got {self.max_staleness}")
        if not self.lease_seconds > 0:
            problems.append(f"lease_seconds must be positive, got {self.lease_seconds}")
        if not self.run_id or any(c in self.run_id for c in " :{}"):
            problems.append(f"run_id must be non-empty without spaces, ':' or braces: {self.run_id!r}")
        if problems:
            raise ConfigurationError("; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigurationError(f"unknown configuration keys: {sorted(unknown)}")
        return cls(**data)


def pull_dtype_of(config: RunConfig) -> str:
    return "float16" if config.pull_compression.endswith("fp16") else "float32"


def pull_delta_of(config: RunConfig) -> bool:
    return config.pull_compression.startswith("delta")


def compact_indices_of(config: RunConfig) -> bool:
    """Whether sparse indices take the smallest encoding (varints, bitmaps) or travel raw."""
    return config.index_coding == "compact"


def momentum_on_workers(config: RunConfig) -> bool:
    """Whether DGC momentum correction is on: workers keep momentum and weight decay."""
    if config.momentum_correction == "auto":
        return config.optimizer == "sgd" and parse_codec(config.compression).sparsifier is not None
    return config.momentum_correction == "on"


def env_name(dest: str) -> str:
    return "GRADHUB_" + dest.upper()


def apply_env_defaults(parser: argparse.ArgumentParser) -> None:
    """Let GRADHUB_<FLAG> set any flag's default, so containers configure by environment.

    A flag given on the command line still wins over the environment.
    """
    for action in parser._actions:  # argparse offers no public iterator over actions
        if not action.option_strings or action.dest in ("help",):
            continue
        value = os.environ.get(env_name(action.dest))
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.strip().lower() in ("1", "true", "yes", "on")
            continue
        convert = action.type if callable(action.type) else str
        try:
            action.default = convert(value)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"environment variable {env_name(action.dest)}={value!r}: {exc}"
            ) from exc
        action.required = False


def _on_off(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def parse_json_object(text: str) -> dict[str, Any]:
    """argparse type for --model-kwargs."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"channels\": 32}'")
    return value


def add_run_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every RunConfig field. Defaults stay None so that `run_config_from_args`
    can tell a flag the user gave from one they did not (and resolve per-mode defaults)."""
    group = parser.add_argument_group("run configuration (shared by every process of the run)")
    group.add_argument("--mode", choices=MODES,
                       help="sync: barrier per step; ssp: async, no worker more than --ssp-bound pushes ahead; "
                            "async: apply on arrival; async-sa: async at lr / staleness; dc-asgd: async with "
                            "delay compensation (default sync)")
    group.add_argument("--workers", type=int, help="number of workers / data shards (default 2)")
    group.add_argument("--steps", type=int, help="server updates to make (default: sync 3000, async 9000)")
    group.add_argument("--model", help="built-in model name (cnn, wide, mlp, linear) or module:function (default cnn)")
    group.add_argument("--model-kwargs", type=parse_json_object, help="JSON object of keyword arguments for the model")
    group.add_argument("--dataset", help="dataset (default mnist1d)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, help="server-side optimizer (default sgd, with momentum)")
    group.add_argument("--lr", type=float,
                       help="learning rate (default: sync 0.1; async modes 0.03 up to 2 workers, 0.06/workers from 3)")
    group.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                       help="constant, step (x0.1 for the last quarter of steps) or cosine (default step)")
    group.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    group.add_argument("--weight-decay", type=float, help="weight decay (default 5e-4)")
    group.add_argument("--compression",
                       help="gradient codec: none | fp16 | bf16 | int8 | topk:R[+V] | approx-topk:R[+V] | "
                            "randomk:R[+V], V one of fp32 fp16 bf16 int8 (default fp16)")
    group.add_argument("--momentum-correction", choices=("auto", "on", "off"),
                       help="DGC: momentum on the workers, plain SGD on the server (default auto: on for "
                            "sparsifying codecs)")
    group.add_argument("--momentum-masking", type=_on_off,
                       help="DGC: zero the momentum of coordinates just sent, on|off (default off)")
    group.add_argument("--dense-below", type=int,
                       help="sparsifying codecs send tensors smaller than this whole (default 4096)")
    group.add_argument("--clip-norm", type=float, help="local gradient clipping to this L2 norm (default 0: off)")
    group.add_argument("--sparsity-warmup", type=int,
                       help="versions over which the kept fraction falls from 25%% to the codec's (default 0)")
    group.add_argument("--pull-compression", choices=PULL_COMPRESSIONS,
                       help="pulls: none (fp32, whole), fp16, delta (only what changed since the worker's "
                            "version; exact), delta+fp16 (default delta)")
    group.add_argument("--index-coding", choices=INDEX_CODINGS,
                       help="sparse indices on the wire: fast (raw int32) or compact (smallest of raw, delta "
                            "varints, bitmap: fewer bytes, more CPU; for links under about 300 Mb/s) "
                            "(default fast)")
    group.add_argument("--max-staleness", type=int, help="async: refuse pushes staler than this (default 16)")
    group.add_argument("--ssp-bound", type=int, help="ssp: the staleness bound s in pushes (default 3)")
    group.add_argument("--dc-lambda", type=float, help="dc-asgd: lambda_0 of the adaptive compensation (default 2)")
    group.add_argument("--inject-staleness", type=int,
                       help="async modes: apply every push this many pushes late (tau; default 0)")
    group.add_argument("--overlap", type=_on_off,
                       help="async modes: compute the next gradient while the last push is in flight, "
                            "on|off (default off; each push one version staler)")
    group.add_argument("--delay",
                       help="injected delay per worker step, seeded: none | constant:MS | exponential:MEAN_MS | "
                            "lognormal:MEDIAN_MS:SIGMA | pareto:SCALE_MS:ALPHA (default none)")
    group.add_argument("--slowdown", help="per-rank slowdown factors, e.g. 0:3 or 0:3,2:1.5 (default none)")
    group.add_argument("--backup-workers", type=int,
                       help="sync: take each step once all but this many live workers pushed; drop the late (default 0)")
    group.add_argument("--batch-size", type=int, help="samples per worker per step (default 50)")
    group.add_argument("--seed", type=int, help="seed of initialisation and data order (default 0)")
    group.add_argument("--eval-every", type=int, help="evaluate on the held-out split every N versions (default 100)")
    group.add_argument("--lease-seconds", type=float, help="worker lease length; a dead worker leaves within it (default 3)")


_RUN_FLAG_FIELDS = (
    "mode", "workers", "steps", "model", "model_kwargs", "dataset", "optimizer", "lr", "lr_schedule",
    "momentum", "weight_decay", "compression", "dense_below", "momentum_correction", "momentum_masking",
    "clip_norm",
    "sparsity_warmup", "pull_compression", "index_coding", "max_staleness", "ssp_bound", "dc_lambda", "inject_staleness",
    "overlap", "delay", "slowdown", "backup_workers", "batch_size", "seed",
    "eval_every", "lease_seconds",
)


def given_run_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields the user set by flag or environment."""
    return {name: getattr(args, name) for name in _RUN_FLAG_FIELDS if getattr(args, name, None) is not None}


def run_config_from_args(args: argparse.Namespace, run_id: str | None = None) -> RunConfig:
    """A RunConfig from flags, filling per-mode defaults for steps and lr."""
    given = given_run_fields(args)
    mode = given.get("mode", "sync")
    if mode not in MODE_DEFAULTS:
        raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
    values: dict[str, Any] = dict(MODE_DEFAULTS[mode])
    if mode in ASYNC_MODES and "lr" not in given:
        values["lr"] = async_default_lr(given.get("workers", RunConfig.workers))
    values.update(given)
    values["run_id"] = run_id or new_run_id(mode)
    return RunConfig(**values)


def check_agrees(config: RunConfig, given: dict[str, Any]) -> None:
    """Raise when flags the user gave contradict an already published configuration."""
    clashes = [
        f"{name}={value!r} (run has {getattr(config, name)!r})"
        for name, value in given.items()
        if getattr(config, name) != value
    ]
    if clashes:
        raise ConfigurationError(
            f"run {config.run_id} is already configured differently: {', '.join(clashes)}"
        )
