"""nox sessions: tests (CPU), lint, gpu (tests marked gpu; needs CUDA)."""

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"


def install(session: nox.Session) -> None:
    # The local CPU wheel first: a bare "torch" requirement would pull a multi-GB CUDA build.
    session.install("torch==2.13.0")
    session.install("-e", ".[test]")


@nox.session
def tests(session: nox.Session) -> None:
    install(session)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "parity", "pipelines", "fixtures", "reports", "tests", "benchmarks", "noxfile.py")


@nox.session
def gpu(session: nox.Session) -> None:
    """GPU-only tests, on a CUDA machine (uses that machine's torch)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", "-m", "gpu", *session.posargs)
