"""Score a million rows in batches across the pool, then total a DataFrame.

python -m examples.scoring.main
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pandas as pd

import corral


async def main() -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1_000_000, 64)).astype(np.float32)  # 244 MiB
    orders = pd.DataFrame(
        {
            "when": pd.Timestamp("2026-01-01")
            + pd.to_timedelta(rng.integers(0, 30 * 86400, 200_000), unit="s"),
            "region": rng.choice(["north", "south", "east", "west"], 200_000),
            "quantity": rng.integers(1, 10, 200_000),
            "price": rng.random(200_000).round(2) * 100,
        }
    )

    async with corral.Pool("examples.scoring.workers:app", size=2) as pool:
        started = time.perf_counter()
        batches = np.array_split(features, 16)  # views: nothing is copied here
        scores = np.concatenate(await asyncio.gather(*(pool.call("score", b) for b in batches)))
        took = time.perf_counter() - started
        print(f"scored {len(scores):,} rows in {took:.2f} s; mean score {scores.mean():.4f}")

        started = time.perf_counter()
        totals = await pool.call("daily_totals", orders)
        took = time.perf_counter() - started
        print(f"totalled {len(orders):,} orders into {len(totals)} rows in {took:.2f} s")
        print(totals.head(4))


if __name__ == "__main__":
    asyncio.run(main())
