"""Generation's user errors: one line naming the flag (exit 2), or a warning; never a
traceback. Two tiny --mock-data checkpoints (learned absolute positions, RoPE + MTP),
trained for two steps; every case runs in one generation process to keep the cost low.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.functional.launcher import ROOT, launch

pytestmark = pytest.mark.functional

TRAIN = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--train-iters", "2", "--eval-iters", "0", "--mock-data"]

# Runs generate.main() on each argv in one process; prints [[rc, stderr], ...] as JSON.
DRIVER = """
import contextlib, io, json, logging, sys
from mtp_megatron.generate import main
results = []
for argv in json.loads(sys.argv[1]):
    logging.getLogger().handlers.clear()
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except BaseException as exc:  # a traceback is a failure of the test, not of main
            import traceback
            rc, _ = 99, traceback.print_exc()
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_errors")
    saves = {}
    for name, extra in (("learned", ["--position-embedding-type", "learned_absolute"]),
                        ("rope", ["--mtp-num-layers", "1"])):
        run = launch(TRAIN + extra + ["--save", str(root / name)],
                     output_dir=str(root / f"run_{name}"), torchrun=False)
        assert run.returncode == 0, run
        saves[name] = root / name
    corrupt = root / "corrupt"
    shutil.copytree(saves["learned"], corrupt)
    # every shard cut to an eighth: which file, and which part of it, holds the model
    # weights (the optimizer state follows them) depends on how the megatron-core release
    # buckets its writes; generation reads the weights only
    for shard in sorted((corrupt / "iter_0000002").glob("*.distcp")):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 8])
    saves["corrupt"] = corrupt
    return saves


def run_cases(cases):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argvs = [[str(a) for a in case] for case in cases]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_generation_errors_are_one_line_naming_the_flag(checkpoints):
    learned, rope, corrupt = checkpoints["learned"], checkpoints["rope"], checkpoints["corrupt"]
    ids = lambda n: " ".join(str(i) for i in range(1, n + 1))  # noqa: E731
    cases = [
        # (argv, rc, what stderr must say); each used to end in a traceback
        (["--load", learned, "--prompt", ids(40), "--mode", "greedy", "--max-new-tokens", 4],
         2, "--prompt: a prompt of 40 tokens is longer than the 32 learned positions"),
        (["--load", learned, "--prompt", ids(30), "--mode", "greedy", "--max-new-tokens", 4],
         2, "--max-new-tokens 4: a 30-token prompt plus 4 new tokens needs 33 positions"),
        (["--load", learned, "--prompt", "1 2 99999", "--mode", "greedy"],
         2, "token id 99999 is outside the checkpoint's vocabulary (ids 0 to 511)"),
        (["--load", learned, "--prompt", "def main(", "--mode", "greedy"],
         2, "trained with --mock-data, so a prompt is token ids"),
        (["--load", corrupt, "--prompt", "1 2", "--mode", "greedy", "--max-new-tokens", 4],
         2, "cannot load the model weights, it is incomplete or corrupt ("),
        # RoPE past the trained length: runs, with a warning
        (["--load", rope, "--prompt", ids(30), "--max-new-tokens", 8, "--no-baseline"],
         0, "needs 37 positions, more than the trained --seq-length 32"),
        (["--load", learned, "--prompt", ids(20), "--mode", "greedy", "--max-new-tokens", 8],
         0, ""),  # inside the trained length: no error, no warning
    ]
    results = run_cases([c[0] for c in cases])
    for (argv, rc, says), (got_rc, stderr) in zip(cases, results):
        assert got_rc == rc and says in stderr, (argv, got_rc, stderr[-2000:])
        assert "Traceback" not in stderr, stderr[-2000:]
        assert "positions" not in stderr or rc or says, stderr  # no warning when inside
