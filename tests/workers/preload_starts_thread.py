"""A preload module that starts a thread at import: unsafe to fork after."""

import threading

_stop = threading.Event()
threading.Thread(target=_stop.wait, name="started-by-import", daemon=True).start()
