"""What one worker is to be: its command line, environment and options.

Owns: ``WorkerSpec``, built by the pool's supervisor and read by every
launcher: the worker's argv (``command``, ``template_command``,
``worker_args``), its environment (the parent's, or only ``env_allowlist``,
plus ``env`` and one thread for math libraries) and its large-buffer prefix.
Must not touch: processes or descriptors (the launchers start them).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from .._shm import LargeBuffers

__all__ = ["MATH_THREAD_VARIABLES", "SYS_PATH_ENV", "WorkerSpec"]

SYS_PATH_ENV = "CORRAL_SYS_PATH"
MATH_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
# Runs in the worker before anything else, so that corral itself (and the
# target) import the way they do in the parent, whatever sys.path that took.
_BOOTSTRAP = (
    "import json,os,sys\n"
    f"p=os.environ.get({SYS_PATH_ENV!r})\n"
    "if p: sys.path[:]=json.loads(p)\n"
    "from corral.worker.__main__ import main\n"
    "main()\n"
)
_TEMPLATE_BOOTSTRAP = _BOOTSTRAP.replace("corral.worker.__main__", "corral.worker._template")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to start one worker."""

    worker_id: str
    target: str
    python: str | None = None  # None: the parent's interpreter, with its sys.path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    max_message_size: int = 0
    env_allowlist: tuple[str, ...] | None = None  # None: inherit the whole environment
    single_threaded_math: bool = True
    preload: tuple[str, ...] = ()  # modules a template imports once; workers fork from it
    startup_timeout: float = 60.0  # bounds the template's preload imports too
    # Large buffers out of band (``_shm``): buffers over the threshold go through
    # segments named ``shm_prefix...``; 0 keeps everything on the pipes.
    large_buffer_threshold: int = 0
    shm_prefix: str = ""
    # Over TCP (``_streamed``): buffers over ``stream_threshold`` follow their
    # frame (0: inline), compressed with ``compression`` (None: not at all).
    # Set by the shim for the worker it starts; ``compression`` by the pool.
    stream_threshold: int = 0
    compression: str | None = None
    # True: large bytes arrive as read-only memoryviews of their segments (both sides).
    large_bytes_views: bool = False

    def command(self, read_fd: int, write_fd: int, control_fd: int) -> list[str]:
        """The worker's argv (without the shepherd in front)."""
        args = ["--fds", f"{read_fd},{write_fd},{control_fd}", *self.worker_args()]
        if self.python is None:
            return [sys.executable, "-c", _BOOTSTRAP, *args]
        return [self.python, "-m", "corral.worker", *args]

    def template_command(self, socket_fd: int) -> list[str]:
        """The preload template's argv (without the shepherd in front)."""
        args = ["--socket", str(socket_fd), "--preload", ",".join(self.preload)]
        if self.python is None:
            return [sys.executable, "-c", _TEMPLATE_BOOTSTRAP, *args]
        return [self.python, "-m", "corral.worker._template", *args]

    def worker_args(self) -> list[str]:
        """The worker's options after ``--fds`` (a forked worker gets the same)."""
        large = (
            [
                "--large-buffer-threshold",
                str(self.large_buffer_threshold),
                "--shm-prefix",
                self.shm_prefix,
                *(["--large-bytes", "memoryview"] if self.large_bytes_views else []),
            ]
            if self.large_buffer_threshold
            else []
        )
        if self.stream_threshold:
            large += ["--stream-threshold", str(self.stream_threshold)]
            if self.compression:
                large += ["--compression", self.compression]
        return [
            "--worker-id",
            self.worker_id,
            "--max-message-size",
            str(self.max_message_size),
            *large,
            self.target,
        ]

    def shepherd_options(self) -> list[str]:
        """The shepherd's options: which segments to unlink once the worker is gone."""
        return [f"--unlink-prefix={self.shm_prefix}"] if self.shm_prefix else []

    def large_buffers(self) -> LargeBuffers | None:
        """The pool's side of this worker's segments; None when the path is off."""
        if not self.large_buffer_threshold:
            return None
        return LargeBuffers(
            self.shm_prefix, self.large_buffer_threshold, "p", views=self.large_bytes_views
        )

    def environment(self) -> dict[str, str]:
        if self.env_allowlist is None:
            inherited = dict(os.environ)
        else:
            inherited = {k: os.environ[k] for k in self.env_allowlist if k in os.environ}
        env = {**inherited, **self.env}
        if self.single_threaded_math:
            for name in MATH_THREAD_VARIABLES:
                env.setdefault(name, "1")
        if self.python is None:
            env[SYS_PATH_ENV] = json.dumps([p or os.getcwd() for p in sys.path])
        return env
