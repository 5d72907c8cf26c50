"""The study's pruner honours tune.prune_after (no pruning before that many training steps)."""
import dataclasses

import optuna
import pytest

from exaggerate.config import Config, ConfigError, Tune
from exaggerate.tune import _pruner


def _config(**tune) -> Config:
    return dataclasses.replace(Config(), tune=dataclasses.replace(Tune(), **tune))


def _pruned_at(prune_after: int) -> list[int]:
    """Steps at which a trial far worse than the finished ones would be pruned."""
    cfg = _config(startup_trials=1, prune_after=prune_after, trial_steps=1200)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(pruner=_pruner(cfg), sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(2):
        good = study.ask()
        for step in (300, 600, 900, 1200):
            good.report(0.1, step)
        study.tell(good, 0.1)
    bad = study.ask()
    pruned = []
    for step in (300, 600, 900):
        bad.report(0.5, step)
        if bad.should_prune():
            pruned.append(step)
    return pruned


def test_pruning_waits_for_prune_after():
    assert _pruned_at(0) == [300, 600, 900]
    assert _pruned_at(600) == [600, 900]


def test_prune_after_must_fall_inside_a_trial():
    with pytest.raises(ConfigError, match="tune.prune_after"):
        _config(prune_after=1200, trial_steps=1200).tune.validate("tune")
    with pytest.raises(ConfigError, match="tune.prune_after"):
        _config(prune_after=-1).tune.validate("tune")


def test_parallel_workers_share_the_cores(monkeypatch):
    from exaggerate import tune

    monkeypatch.setattr(tune.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert tune.worker_threads(0, 1) == 0  # one worker: torch's default
    assert tune.worker_threads(0, 2) == 4
    assert tune.worker_threads(0, 16) == 1
    assert tune.worker_threads(3, 2) == 3  # an explicit base.threads wins
