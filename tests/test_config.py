"""Run configuration: per-mode defaults, flags vs environment, validation."""

from __future__ import annotations

import argparse

import pytest

from gradhub.config import (
    RunConfig,
    add_run_config_arguments,
    apply_env_defaults,
    check_agrees,
    run_config_from_args,
)
from gradhub.errors import ConfigurationError
from gradhub.models import build_model, builtin_models, count_parameters

pytestmark = pytest.mark.timeout(30)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--redis-url")
    add_run_config_arguments(p)
    apply_env_defaults(p)
    return p


def test_mode_defaults_fill_what_was_not_given(monkeypatch):
    monkeypatch.delenv("GRADHUB_MODE", raising=False)
    sync = run_config_from_args(parser().parse_args([]), "r1")
    assert (sync.mode, sync.steps, sync.lr) == ("sync", 3000, 0.1)
    asyn = run_config_from_args(parser().parse_args(["--mode", "async", "--lr", "0.5"]), "r2")
    assert (asyn.mode, asyn.steps, asyn.lr) == ("async", 9000, 0.5)


@pytest.mark.parametrize(("workers", "lr"), [(None, 0.03), ("2", 0.03), ("3", 0.015), ("4", 0.015), ("8", 0.0075)])
def test_the_async_default_rate_shrinks_beyond_two_workers(monkeypatch, workers, lr):
    monkeypatch.delenv("GRADHUB_MODE", raising=False)
    args = ["--mode", "ssp"] + (["--workers", workers] if workers else [])
    assert run_config_from_args(parser().parse_args(args), "r").lr == pytest.approx(lr)
    sync = run_config_from_args(parser().parse_args(["--workers", "8"]), "s")
    assert sync.lr == 0.1  # sync's rate does not depend on the worker count


def test_environment_sets_defaults_and_flags_win(monkeypatch):
    monkeypatch.setenv("GRADHUB_WORKERS", "5")
    monkeypatch.setenv("GRADHUB_COMPRESSION", "topk:0.01")
    monkeypatch.setenv("GRADHUB_MODEL_KWARGS", '{"channels": 8}')
    config = run_config_from_args(parser().parse_args(["--compression", "none"]), "r")
    assert config.workers == 5
    assert config.compression == "none"
    assert config.model_kwargs == {"channels": 8}


def test_bad_environment_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GRADHUB_WORKERS", "many")
    with pytest.raises(ConfigurationError, match="GRADHUB_WORKERS='many'"):
        parser()


def test_invalid_configurations_are_refused_with_every_problem_named():
    with pytest.raises(ConfigurationError) as info:
        RunConfig(run_id="r", mode="fast", workers=0, lr=-1)
    for text in ("mode must be one of", "workers must be at least 1", "lr must be positive"):
        assert text in str(info.value)
    with pytest.raises(ConfigurationError, match=r"backup_workers must be >= 0 and below workers \(2\)"):
        RunConfig(run_id="r", workers=2, backup_workers=2)
    with pytest.raises(ConfigurationError, match="backup_workers applies to mode sync only"):
        RunConfig(run_id="r", mode="async", workers=3, backup_workers=1)


def test_json_round_trip_and_agreement():
    config = RunConfig(run_id="r", mode="async", model_kwargs={"hidden_size": 7})
    assert RunConfig.from_json(config.to_json()) == config
    check_agrees(config, {"mode": "async"})
    with pytest.raises(ConfigurationError, match="already configured differently: mode='sync'"):
        check_agrees(config, {"mode": "sync"})


def test_models_by_name_and_by_import_path():
    assert {"cnn", "mlp", "linear", "wide"} <= set(builtin_models())
    assert count_parameters(build_model("cnn")) == 5210  # the MNIST-1D paper's CNN
    assert count_parameters(build_model("wide")) == 1_046_990  # where compression matters
    custom = build_model("torch.nn:Linear", {"in_features": 40, "out_features": 10})
    assert count_parameters(custom) == 410
    for spec, message in [("nope", "unknown model"), ("no_such_module:f", "cannot import"),
                          ("math:nothing", "no callable")]:
        with pytest.raises(ConfigurationError, match=message):
            build_model(spec)
