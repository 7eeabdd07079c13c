"""Stands in for a heavy library: importing it takes ``CORRAL_BENCH_IMPORT_SECONDS`` (1 s)."""

from __future__ import annotations

import os
import time

time.sleep(float(os.environ.get("CORRAL_BENCH_IMPORT_SECONDS", "1.0")))
