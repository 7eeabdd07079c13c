"""The pip command that adds an extra to corral as it was installed here.

Owns: ``install_command``, used by the messages that say what to install (the
command line's rich, the benchmark harness's libraries). corral installed from a
source checkout needs ``pip install -e '.[cli]'`` (or the checkout's path), and
``pip install 'corral[cli]'`` only works for a copy from a package index.

How it was installed is read from the distribution's ``direct_url.json`` (PEP
610), which pip writes for installs from a directory or URL and not for installs
from an index. Must not touch: anything but that metadata; never runs pip.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from urllib.parse import unquote, urlparse

__all__ = ["install_command"]


def install_command(extra: str, cwd: str | None = None) -> str:
    """``pip install ...`` that adds ``extra`` to this corral, as it was installed."""
    origin = _origin()
    if origin is None:
        return f"pip install 'corral[{extra}]'"
    path, editable = origin
    here = os.path.realpath(cwd or os.getcwd())
    shown = "." if os.path.realpath(path) == here else path
    return f"pip install {'-e ' if editable else ''}'{shown}[{extra}]'"


def _origin() -> tuple[str, bool] | None:
    """The local directory corral was installed from and whether editably; None if
    it came from an index (or its metadata cannot be read)."""
    try:
        text = metadata.distribution("corral").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    url = urlparse(str(info.get("url", "")))
    dir_info = info.get("dir_info")
    if url.scheme != "file" or not isinstance(dir_info, dict):
        return None  # an archive or a VCS URL: the index form is the best guess
    return unquote(url.path), bool(dir_info.get("editable", False))
