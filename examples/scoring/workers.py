"""Workers that score NumPy batches and transform DataFrames.

The model is loaded once per worker (``on_startup``); each call receives its
batch as an array that views shared memory (no copy, no pickle) and returns a
new array or frame the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from corral.worker import App

app = App("scoring")
model: dict[str, Any] = {}


@app.on_startup
def load_model() -> None:
    # A stand-in for a real model: a fixed linear layer and a bias.
    rng = np.random.default_rng(42)
    model["weights"] = rng.standard_normal(64).astype(np.float32)
    model["bias"] = np.float32(0.1)


@app.handler
def score(batch: np.ndarray) -> np.ndarray:
    """One score per row of a (rows, 64) float32 batch: sigmoid(batch @ w + b)."""
    logits = batch @ model["weights"] + model["bias"]
    return 1.0 / (1.0 + np.exp(-logits))


@app.handler
def daily_totals(orders: pd.DataFrame) -> pd.DataFrame:
    """Revenue and order count per day and region, from an orders frame."""
    orders = orders.assign(revenue=orders["quantity"] * orders["price"])
    grouped = orders.groupby([orders["when"].dt.floor("D"), "region"])
    return grouped.agg(revenue=("revenue", "sum"), orders=("quantity", "size"))
