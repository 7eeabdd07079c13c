"""The arrays example (examples/scoring, docs/arrays.md) runs against real workers."""

from __future__ import annotations

import pytest

from corral import Pool

np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")


async def test_the_scoring_example_scores_batches_and_totals_orders() -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((5000, 64)).astype(np.float32)
    orders = pd.DataFrame(
        {
            "when": pd.to_datetime(["2026-01-01 10:00", "2026-01-01 11:00", "2026-01-02 09:00"]),
            "region": ["north", "north", "south"],
            "quantity": [2, 3, 1],
            "price": [10.0, 1.0, 5.0],
        }
    )
    async with Pool("examples.scoring.workers:app", size=1) as pool:
        scores = await pool.call("score", features[::2])  # a strided view travels too
        assert scores.shape == (2500,) and scores.dtype == np.float32
        weights = np.random.default_rng(42).standard_normal(64).astype(np.float32)
        expected = 1.0 / (1.0 + np.exp(-(features[::2] @ weights + np.float32(0.1))))
        assert np.allclose(scores, expected, rtol=1e-5)
        totals = await pool.call("daily_totals", orders)
    assert totals["revenue"].tolist() == [23.0, 5.0]
    assert totals["orders"].tolist() == [2, 1]
    assert totals.index.names == ["when", "region"]
