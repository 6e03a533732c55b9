import os

import pytest

os.environ.setdefault("GPIOZERO_PIN_FACTORY", "mock")


@pytest.fixture(autouse=True, scope="session")
def _work_in_a_temporary_directory(tmp_path_factory):
    """trial runs tests in _trial_temp; under pytest, TestCase.mktemp()
    would otherwise create its directories inside the repository."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trial"))
    yield
    os.chdir(old)
