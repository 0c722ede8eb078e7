"""Each worker trains on its own shard: disjoint across ranks, all of it, reshuffled each epoch."""

from __future__ import annotations

import pytest
import torch

from gradhub.config import RunConfig
from gradhub.data import load_dataset, shard_indices
from gradhub_worker.worker import ShardBatches

pytestmark = pytest.mark.timeout(60)


def test_shards_are_disjoint_and_cover_the_training_set():
    shards = [set(shard_indices(4000, rank, 3).tolist()) for rank in range(3)]
    assert set().union(*shards) == set(range(4000))
    assert sum(len(s) for s in shards) == 4000


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_a_worker_sees_only_its_shard_and_all_of_it_each_epoch(loader_workers):
    config = RunConfig(run_id="r", workers=4, batch_size=50, seed=1)
    data = load_dataset()
    shard = data.x_train[shard_indices(len(data.y_train), 2, 4)]
    batches = ShardBatches(config, rank=2, device=torch.device("cpu"), loader_workers=loader_workers,
                           cache_dir=None)
    assert batches.size == 1000
    per_epoch = batches.size // config.batch_size
    epochs = []
    for _ in range(2):
        rows = torch.cat([batches.next()[0] for _ in range(per_epoch)])
        epochs.append(rows)
        # Every row is a row of the shard, and each appears exactly once per epoch.
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, shard.tolist()))
    assert not torch.equal(epochs[0], epochs[1]), "the second epoch was not reshuffled"
