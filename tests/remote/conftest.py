"""One real NDIF stack (redis, moto S3, Ray, ndif controller + API) per test session.

Started by `vlminterp.remote.serve.LocalNDIF` on 127.0.0.1 with the tiny models saved to a
temporary directory. If it cannot start: skipped with the reason outside CI, failed in CI
(env CI set). Server venv: $VLMINTERP_NDIF_VENV or ~/.cache/vlminterp/ndif-venv
(`python -m vlminterp.remote.serve --setup DIR`).
"""

import os
import time

import pytest

REMOTE_FAMILIES = ["tiny-llava", "tiny-qwen2-vl"]
_REASONS = []


def pytest_configure(config):
    config.addinivalue_line("markers", "remote: needs a real NDIF stack started on 127.0.0.1")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def ndif(tmp_path_factory):
    """``(stack, {family: model_dir})`` with every family of REMOTE_FAMILIES deployed."""
    from vlminterp.remote.serve import DEFAULT_VENV, LocalNDIF, save_tiny

    root = tmp_path_factory.mktemp("ndif-models")
    dirs = {m: save_tiny(m, str(root / m)) for m in REMOTE_FAMILIES}
    stack = LocalNDIF(list(dirs.values()), venv=DEFAULT_VENV, log=lambda m: print(m))
    started = time.time()
    try:
        stack.start()
    except Exception as e:  # StackError, or anything else that stops the stack starting
        stack.stop()
        reason = f"NDIF stack could not start: {type(e).__name__}: {e}"
        _REASONS.append(reason)
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    stack.times["fixture_s"] = time.time() - started
    yield stack, dirs
    stack.stop()


def pytest_terminal_summary(terminalreporter):
    for reason in dict.fromkeys(_REASONS):
        terminalreporter.write_line(f"tests/remote: {reason}")
