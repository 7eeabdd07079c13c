"""Development sessions: ``nox`` runs tests, lint and typecheck; ``nox -s demo`` runs the demo.

Each session builds its own virtualenv (the standard library's ``venv``) under
``.nox/``. ``nox -s tests -- -k session`` passes everything after ``--`` to pytest.

The test session runs once per supported Python. nox finds interpreters on PATH
(``python3.12``...) and through version managers; a pyenv version is only usable
when it is active, e.g. ``pyenv global 3.11.7 3.12.1 3.13.0`` (or ``pyenv local``
in this directory): an inactive one's shim exits with an error. A version nox
cannot find is first downloaded if nox can (with uv, or nox's ``pbs`` extra;
``--download-python never`` turns that off), otherwise skipped, or an error with
``--error-on-missing-interpreters`` (the default when the CI variable is set).
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "anyio", "lint", "typecheck"]

ROOT = Path(__file__).parent
PYTHON = "3.11"
SUPPORTED_PYTHONS = ["3.11", "3.12", "3.13"]
LINT_PATHS = ["src", "tests", "benchmarks", "examples", "noxfile.py"]


@nox.session(python=SUPPORTED_PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite, on each supported Python."""
    session.install("-e", ".[suite]")
    session.run("pytest", *session.posargs)


#: Run under anyio's pytest plugin too: the public contract, checkout, cancellation,
#: the checks at the door, cancel scopes, and the ASGI helpers.
ANYIO_TESTS = [
    "tests/test_api.py",
    "tests/test_checkout.py",
    "tests/test_cancellation.py",
    "tests/test_door.py",
    "tests/test_anyio.py",
    "tests/test_asgi.py",
]


@nox.session(python=PYTHON)
def anyio(session: nox.Session) -> None:
    """A representative set of async tests run by anyio's pytest plugin (pytest-asyncio off)."""
    session.install("-e", ".[suite]")
    session.run(
        "pytest",
        "-p",
        "no:asyncio",
        "-W",
        "ignore::pytest.PytestConfigWarning",  # pytest-asyncio's ini options, unused here
        *(session.posargs or ANYIO_TESTS),
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting (checked, not rewritten)."""
    session.install("ruff")
    paths = [path for path in LINT_PATHS if (ROOT / path).exists()]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    session.install(
        "-e",
        ".[asgi,cli,otel,prometheus]",
        "mypy",
        "psutil",
        "pytest",
        "pytest-asyncio",
        "hypothesis",
    )
    session.run("mypy", "--strict", "src/corral")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Run ``corral demo`` from a fresh install."""
    session.install("-e", ".")
    session.run("corral", "demo")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site into ``site/``; any warning is an error (``--strict``)."""
    session.install("-e", ".[docs]")
    # NO_MKDOCS_2_WARNING: mkdocs-material prints a banner about its future on every build.
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmark table: corral against the pipe floor and the alternatives."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks.run", *session.posargs)


@nox.session(python=PYTHON)
def browser(session: nox.Session) -> None:
    """The status page in headless chromium (needs ``apt-get install chromium``).

    Playwright drives Debian's /usr/bin/chromium; its own browser downloads are
    never used (no ``playwright install``). The screenshot lands in artifacts/.
    """
    session.install("-e", ".[suite]")
    session.run("pytest", "tests/browser", *session.posargs)


@nox.session(python=PYTHON)
def dspy(session: nox.Session) -> None:
    """The DSPy example's tests (examples/dspy_service) alone: real DSPy, offline."""
    session.install("-e", ".[suite]")
    session.run("pytest", "tests/test_dspy_example.py", *session.posargs)


@nox.session(python=PYTHON)
def ray(session: nox.Session) -> None:
    """Workers placed over TCP and by a real (local) Ray, alone: one Ray, a simulated
    cluster whose nodes are lost and added, the listener flooded by strangers."""
    session.install("-e", ".[suite]")
    session.run(
        "pytest",
        "tests/test_ray.py",
        "tests/test_ray_nodes.py",
        "tests/test_socket_launcher.py",
        "tests/test_listener_flood.py",
        "tests/test_start_failures.py",
        *session.posargs,
    )


@nox.session(python=PYTHON)
def reliability(session: nox.Session) -> None:
    """The reliability suite alone: chaos, hostile workers, cancellation points,
    the pool state machine and parent death (``-s`` prints the chaos figures)."""
    session.install("-e", ".[suite]")
    session.run(
        "pytest",
        "tests/reliability",
        "tests/test_pool_state_machine.py",
        "tests/test_parent_death.py",
        *session.posargs,
    )
