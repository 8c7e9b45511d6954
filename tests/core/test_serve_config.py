"""`serve` deploys the registry's served algorithms, and its config refuses the others."""

from __future__ import annotations

import pytest

from aggregator.serve_config import (
    OWN_DATA_ALGOS,
    SERVE_ALGOS,
    SERVE_SPLIT_ALGOS,
    ServeConfig,
    load_serve_config,
)
from splitfed.errors import UserError
from splitfed.simulate import REGISTRY, served_names


def test_serve_deploys_what_the_registry_marks_served() -> None:
    assert list(SERVE_ALGOS) == served_names()
    # one split CNN on whole crops: the algorithms without a simulator of their own
    assert set(SERVE_SPLIT_ALGOS) == {n for n in SERVE_ALGOS if REGISTRY[n].simulate is None}
    assert set(OWN_DATA_ALGOS) == set(SERVE_ALGOS) - set(SERVE_SPLIT_ALGOS)


def test_the_config_takes_every_served_algorithm_and_no_other() -> None:
    for name in SERVE_ALGOS:
        assert ServeConfig(algo=name).algo == name
    assert "centralized" in REGISTRY
    with pytest.raises(UserError, match="algo"):
        load_serve_config(None, {"algo": "centralized"})
