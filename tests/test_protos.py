"""The committed stubs are exactly what protos/ generates: the .proto is the source of truth."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.timeout(60)


def test_regenerating_the_stubs_changes_nothing(tmp_path: Path):
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate_protos.py"), "--out", str(tmp_path)],
        check=True, capture_output=True,
    )
    generated = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*_pb2*.py*")}
    committed_root = REPO / "common"
    committed = {p.relative_to(committed_root): p.read_bytes() for p in committed_root.rglob("*_pb2*.py*")}
    assert generated, "the generator produced nothing"
    assert sorted(generated) == sorted(committed), "stub files differ: run `make protos` and commit"
    stale = [str(path) for path in generated if generated[path] != committed[path]]
    assert not stale, f"stubs out of date with protos/: {stale}; run `make protos` and commit"


def test_every_stub_has_its_type_stub():
    stubs = list((REPO / "common").rglob("*_pb2*.py"))
    assert stubs
    for stub in stubs:
        assert stub.with_suffix(".pyi").exists(), f"{stub} has no .pyi"
