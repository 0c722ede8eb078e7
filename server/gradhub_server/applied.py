"""What the server records about a push once its gradient is in the model.

One value type shared by the three places that need the same facts about an
applied push: the counters (stats), the update journal (which writes them next
to the update, so a restarted server can count and deduplicate what it replays),
and the receipts rebuilt from that journal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradhub.domain import Push


@dataclass(frozen=True)
class AppliedPush:
    worker_id: str
    seq: int
    base_version: int
    #: Versions between the push's base and the version it was applied to.
    staleness: int
    rank: int
    wire_bytes: int = 0
    dense_bytes: int = 0
    loss: float = float("nan")

    @classmethod
    def of(cls, push: Push, staleness: int, rank: int) -> AppliedPush:
        meta = push.meta
        return cls(meta.worker_id, meta.seq, meta.base_version, staleness, rank,
                   push.wire_bytes, push.dense_bytes, meta.loss)

    def as_list(self) -> list[Any]:
        return [self.worker_id, self.seq, self.base_version, self.staleness, self.rank,
                self.wire_bytes, self.dense_bytes, self.loss]

    @classmethod
    def from_list(cls, fields: list[Any]) -> AppliedPush:
        worker, seq, base, staleness, rank, wire, dense, loss = fields
        return cls(str(worker), int(seq), int(base), int(staleness), int(rank),
                   int(wire), int(dense), float(loss))
