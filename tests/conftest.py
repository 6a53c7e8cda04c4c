"""Shared test fixtures: paths to the offline data in ../shared/data and the repo root."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests import the top-level scripts and modules (flat layout, no package).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"offline test data {path} is missing: tests expect ../shared/data beside the repo")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def fineweb_sample_dir() -> Path:
    return _require(SHARED_DATA / "fineweb_sample")


@pytest.fixture(scope="session")
def hellaswag_val_path() -> Path:
    return _require(SHARED_DATA / "hellaswag" / "hellaswag_val.jsonl")
