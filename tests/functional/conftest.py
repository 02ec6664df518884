"""Runs that several functional modules check, trained once per session.

``saved_run(name)`` trains one of ``launcher.SAVED_LAYOUTS`` on first use (20 iterations of
the tiny model with MTP D=2 on mock data, checkpoints at 10 and 20) and returns
``(directory, Run)``: the checkpoints are in ``directory / "ck"``. test_checkpoint_resume
resumes them; test_train_layouts checks the same runs' losses and log lines instead of
training those layouts again.
"""

from __future__ import annotations

import pytest

from tests.functional.launcher import SAVED_ARGS, SAVED_LAYOUTS, launch


@pytest.fixture(scope="session")
def saved_run(tmp_path_factory):
    runs = {}

    def get(name):
        if name not in runs:
            nproc, extra = SAVED_LAYOUTS[name]
            out = tmp_path_factory.mktemp(name)
            run = launch(SAVED_ARGS + extra + ["--save", str(out / "ck"), "--save-interval", "10"],
                         output_dir=str(out / "run"), nproc=nproc)
            assert run.returncode == 0, run
            runs[name] = (out, run)
        return runs[name]

    return get
