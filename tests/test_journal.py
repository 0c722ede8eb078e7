"""The update journal: replaying it onto the state it started from gives the same model, bit for
bit; a torn tail or a corrupted record ends the replay at the last good record and never
poisons the records written after a restart."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradhub_server.applied import AppliedPush
from gradhub_server.journal import UpdateJournal
from gradhub_server.schedules import schedule_from_name
from gradhub_server.store import ParameterStore
from gradhub_server.update_rules import Gradient, SparseGradient, build_update_rule

pytestmark = pytest.mark.timeout(60)


def make_store(optimizer: str = "adam") -> ParameterStore:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5))
    rule = build_update_rule(optimizer, list(model.parameters()), 0.01, 0.9, 1e-4)
    return ParameterStore(model, rule, steps=1000, schedule=schedule_from_name("cosine"))


def gradient(store: ParameterStore, seed: int) -> list[Gradient]:
    """Sparse for some parameters, dense for others: both kinds must round-trip."""
    generator = torch.Generator().manual_seed(seed)
    result: list[Gradient] = []
    for i, shape in enumerate(store.shapes):
        numel = math.prod(shape)
        if i % 2 == 0:
            k = max(1, numel // 10)
            indices = torch.randperm(numel, generator=generator)[:k]
            result.append(SparseGradient(indices, torch.randn(k, generator=generator)))
        else:
            result.append(torch.randn(shape, generator=generator))
    return result


def run(store: ParameterStore, first_seed: int, count: int) -> list[AppliedPush]:
    counted: list[AppliedPush] = []
    store.on_applied = counted.extend
    for seed in range(first_seed, first_seed + count):
        if seed % 7 == 3:
            store.advance()  # an injected-staleness version: journaled, changes nothing
            continue
        push = AppliedPush(f"w{seed % 3}", seed, store.version, seed % 4, seed % 3, 100, 400, 0.5)
        store.apply(gradient(store, seed), lr_scale=1.0 / (1 + seed % 3), pushes=[push])
    return counted


def replayed(tmp_path: Path, store: ParameterStore) -> tuple[ParameterStore, list[AppliedPush]]:
    fresh = make_store()
    counted: list[AppliedPush] = []
    fresh.on_applied = counted.extend
    for record in UpdateJournal(tmp_path / "journal").records_after(0, fresh.shapes):
        fresh.replay(record)
    return fresh, counted


def same_model(a: ParameterStore, b: ParameterStore) -> bool:
    state_a, state_b = a.checkpoint_state(), b.checkpoint_state()
    return (state_a["version"] == state_b["version"]
            and all(torch.equal(state_a["model"][k], state_b["model"][k]) for k in state_a["model"])
            and all(torch.equal(state_a["optimizer"]["state"][i]["exp_avg_sq"],
                                state_b["optimizer"]["state"][i]["exp_avg_sq"])
                    for i in state_a["optimizer"]["state"]))


def test_replaying_the_journal_rebuilds_the_model_optimizer_and_counters_bit_for_bit(tmp_path: Path):
    store = make_store()
    store.journal = UpdateJournal(tmp_path / "journal")
    counted = run(store, 0, 40)
    store.journal.close()
    fresh, recounted = replayed(tmp_path, store)
    assert fresh.version == store.version == 40
    assert same_model(fresh, store)
    assert recounted == counted and len(counted) == 40 - 6  # seeds 3, 10, 17, 24, 31, 38 only advanced


def test_a_journal_continues_across_rotations_and_pruning_keeps_what_the_oldest_checkpoint_needs(tmp_path: Path):
    store = make_store()
    journal = store.journal = UpdateJournal(tmp_path / "journal")
    run(store, 0, 10)
    journal.rotate()
    run(store, 10, 10)
    journal.rotate()
    run(store, 20, 10)
    journal.prune(covered_up_to=15)  # the first segment (versions 1-10) is wholly covered
    assert sorted(p.name for p in (tmp_path / "journal").iterdir()) == [
        "seg-0000000011.log", "seg-0000000021.log"]
    journal.close()
    fresh = make_store()
    run(fresh, 0, 15)  # the checkpoint at version 15
    for record in UpdateJournal(tmp_path / "journal").records_after(15, fresh.shapes):
        fresh.replay(record)
    assert same_model(fresh, store)


@pytest.mark.parametrize("damage", ["torn", "flipped"])
def test_a_damaged_tail_ends_the_replay_at_the_last_good_record_and_later_records_follow_good_ones(
    tmp_path: Path, damage: str
):
    store = make_store()
    journal = store.journal = UpdateJournal(tmp_path / "journal")
    run(store, 0, 12)
    journal.close()
    segment = next((tmp_path / "journal").glob("seg-*.log"))
    good = segment.read_bytes()
    expected = make_store()
    run(expected, 0, 11)
    # The process died while writing version 12: cut it short, or flip one byte of it.
    last_record_starts = good.rindex(b"GHJ1")
    if damage == "torn":
        segment.write_bytes(good[:last_record_starts + 20])
    else:
        data = bytearray(good)
        data[last_record_starts + 40] ^= 0x01
        segment.write_bytes(bytes(data))

    restarted = make_store()
    restarted.journal = UpdateJournal(tmp_path / "journal")
    for record in restarted.journal.records_after(0, restarted.shapes):
        restarted.replay(record)
    assert restarted.version == 11 and same_model(restarted, expected)
    assert segment.stat().st_size == last_record_starts  # the damaged record is gone
    # The restarted server writes version 12 again, and more, after the good records.
    run(restarted, 100, 5)
    run(expected, 100, 5)
    restarted.journal.close()
    again, _ = replayed(tmp_path, restarted)
    assert again.version == 16 and same_model(again, expected)


def test_segments_after_a_gap_are_set_aside_not_replayed(tmp_path: Path):
    store = make_store()
    journal = store.journal = UpdateJournal(tmp_path / "journal")
    run(store, 0, 5)
    journal.rotate()
    run(store, 5, 5)
    journal.rotate()
    run(store, 10, 5)
    journal.close()
    (tmp_path / "journal" / "seg-0000000006.log").unlink()  # versions 6-10 missing
    fresh, _ = replayed(tmp_path, store)
    assert fresh.version == 5
    assert (tmp_path / "journal" / "seg-0000000011.log.bad").exists()
    assert not (tmp_path / "journal" / "seg-0000000011.log").exists()


def test_a_journal_that_cannot_be_written_refuses_the_update_and_leaves_the_model_untouched(tmp_path: Path):
    from gradhub.errors import ServerUnavailable

    store = make_store()
    blocker = tmp_path / "journal"
    blocker.write_text("a file where the journal folder should be")
    store.journal = UpdateJournal(blocker)
    before = store.checkpoint_state()
    with pytest.raises(ServerUnavailable, match="cannot write version 1 to the update journal"):
        store.apply(gradient(store, 0))
    after = store.checkpoint_state()
    assert after["version"] == 0
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
