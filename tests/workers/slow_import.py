"""A module that takes about a second to import, and says who imported it.

Stands in for a heavy library (numpy, a model) in the preload tests. Each import
appends the importing process's pid to the file named by ``CORRAL_TEST_IMPORT_LOG``
(if set), so a test can count imports and tell which process did them.
"""

from __future__ import annotations

import os
import time

IMPORT_SECONDS = float(os.environ.get("CORRAL_TEST_IMPORT_SECONDS", "1.0"))

time.sleep(IMPORT_SECONDS)  # the cost preloading saves, not a synchronization

IMPORTED_BY = os.getpid()

_log = os.environ.get("CORRAL_TEST_IMPORT_LOG")
if _log:
    with open(_log, "a") as f:
        f.write(f"{IMPORTED_BY}\n")
