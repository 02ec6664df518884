"""Every shell command shown in README.md and docs/*.md runs as shown, in a CPU-sized form.

Each page's commands run in order in one scratch directory (so ``runs/x/checkpoints``
trained by one command is there for the ``generate`` or ``hf export`` after it), with the
repository's ``launch/``, ``examples/``, ``benchmarks/`` and ``scripts/`` linked in and its
package on PYTHONPATH. What "CPU-sized" changes, and nothing else:

* a training run gets ``--train-iters 2`` and a tiny model appended (later flags win);
* inputs a command assumes (``corpus.jsonl``, ``books/``, ``tok/``, ``prompts.txt``, a
  checkpoint at ``runs/x/checkpoints``, a Hugging Face directory) are made first.

Commands that need what CI has not (a GPU, Docker, a site's cluster) or take tens of
minutes (``make test``, the experiments, the benchmarks) are not run here; every such
command is listed in :data:`NOT_RUN` with the reason and where it is tested instead, and a
command shown in the docs that is neither run nor listed fails the test, so a new command
cannot slip in untried.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.functional.launcher import ROOT, launch_env
from tests.unit.test_docs import PAGES, _code_blocks, _commands

pytestmark = pytest.mark.functional

TINY = ["--train-iters", "2", "--eval-iters", "1", "--eval-interval", "2", "--log-interval",
        "1", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "1", "--ffn-hidden-size", "64"]

# Shown but not run here: (a pattern the command matches, why, where it is tested)
NOT_RUN = [
    (r"^make (test|test-fast|lint|test-compat)\b", "CI runs it (.ci/run)", ".ci/run"),
    (r"^make demo$", "the mission command, 200 iterations",
     "tests/functional/test_mission_command.py"),
    (r"^make compare|experiments\.compare", "20-30 minutes of training",
     "tests/functional/test_compare.py (a shortened comparison)"),
    (r"benchmarks/", "a benchmark: minutes, prints ratios", "docs/performance.md"),
    (r"\bsbatch\b|submit\.sh (?!.*--plan-only)", "submits to a Slurm cluster",
     "tests/slurm (a real two-node Slurm)"),
    (r"install_slurm\.sh|-m slurm tests/slurm|MTP_SLURM_TEST_SITE", "the slurm tier",
     ".ci/run"),
    (r"ngc_tests\.sh|docker run|device_smoke\.sh", "a GPU machine or Docker",
     "scripts/gpu_check.py on a GPU"),
    (r"^validation at iteration|^mtp_1 acceptance", "log output, not a command", "-"),
    (r"^python -c \"from transformers", "loads the export (below) in transformers",
     "tests/unit/test_hf.py"),
    (r"--data-path \.\.\.", "the user's own data (a placeholder)",
     "tests/functional/test_hf_train.py (import, then fine-tune at TP2)"),
]


def _not_run(command):
    return next((why for pattern, why, _ in NOT_RUN if re.search(pattern, command)), None)


def _shown_commands():
    for page in PAGES:
        for lang, block in _code_blocks(page):
            if lang not in ("", "bash", "sh", "console"):
                continue
            for command in _commands(block):
                if command.startswith(("|", "[", "mtp_megatron/", "launch/ ", "examples/ ",
                                       "tests/unit", "```")) or " " not in command:
                    continue
                yield page, command


def _without_options_in_brackets(command):
    return re.sub(r"\s\[[^\]]*\]", "", command)


def _cpu_sized(command):
    """The command with a tiny training appended where it trains (a run that loads a
    checkpoint keeps its model: only the iterations are cut, unless it loads
    ``runs/x/checkpoints``, which this test trains with the tiny model)."""
    if "pretrain_gpt_mtp.py" in command and "--dry-run" not in command:
        nproc = int((re.search(r"--nproc-per-node[ =](\d+)", command) or [0, 1])[1])
        keeps = "--load" in command and "--load runs/x/checkpoints" not in command
        tiny = TINY[:8] if keeps else TINY
        return f"{command} {' '.join(tiny)} --global-batch-size {nproc}"
    return command


def _prepare(scratch):
    """Inputs the shown commands assume."""
    (scratch / "corpus.jsonl").write_text("".join(
        json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 20}) + "\n"
        for i in range(40)))
    (scratch / "books").mkdir()
    (scratch / "books" / "a.txt").write_text("Once upon a time. " * 400)
    (scratch / "notes.txt").write_text("A note. " * 400)
    (scratch / "src").mkdir()
    (scratch / "src" / "m.py").write_text("import os\nprint(os.sep)\n" * 200)
    (scratch / "prompts.txt").write_text("def parse(\nimport os\n")
    (scratch / "tok").mkdir()
    from tests.unit.test_preprocess import _hf_tokenizer_dir

    _hf_tokenizer_dir(scratch / "tok", True)
    for name in ("launch", "examples", "benchmarks", "scripts"):
        (scratch / name).symlink_to(os.path.join(ROOT, name))
    # "my.yaml": a user's config, planned for 1,024 GPUs in docs/planner.md: the GPU
    # example with a global batch that 1,024 data-parallel ranks can share
    import yaml

    mine = yaml.safe_load(open(os.path.join(ROOT, "examples", "gpt_350m_mtp1_gpu.yaml")))
    mine.setdefault("training", {})["global_batch_size"] = 8192
    (scratch / "my.yaml").write_text(yaml.safe_dump(mine))


def _needs(scratch, command, env):
    """A checkpoint, a run or an HF directory a command reads but the page did not make
    first."""
    for run in re.findall(r"(?<=\s)(runs/(?:baseline|mtp1))(?=\s)", f" {command} "):
        if not (scratch / run).exists():
            depth = "--mtp-num-layers 1 " if run.endswith("mtp1") else ""
            _run(scratch, f"python launch/pretrain_gpt_mtp.py {depth}--mock-data --output-dir "
                 f"{run} " + " ".join(TINY) + " --global-batch-size 1", env)
    if "runs/x/checkpoints" in command and not (scratch / "runs/x/checkpoints").exists() \
            and "--save runs/x/checkpoints" not in command:
        _run(scratch, "python launch/pretrain_gpt_mtp.py --mtp-num-layers 2 --save "
             "runs/x/checkpoints " + " ".join(TINY) + " --global-batch-size 1", env)
    if "--hf path/to/llama" in command and not (scratch / "path/to/llama").exists():
        if not (scratch / "hf/x").exists():
            _needs(scratch, "runs/x/checkpoints", env)
            _run(scratch, "python -m mtp_megatron.hf export --load runs/x/checkpoints "
                 "--out hf/x", env)
        (scratch / "path/to").mkdir(parents=True)
        (scratch / "path/to/llama").symlink_to(scratch / "hf/x")


def _run(scratch, command, env):
    done = subprocess.run(["bash", "-c", command.replace("python ", f"{sys.executable} ")
                           .replace("torchrun ", f"{sys.executable} -m torch.distributed.run "
                                    "--standalone ")],
                          cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
    return done


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_runs(page, tmp_path):
    env = launch_env({"PYTHONPATH": ROOT, "MTP_PYTHON": sys.executable})
    _prepare(tmp_path)
    ran, timings = 0, []
    for shown_page, command in _shown_commands():
        if shown_page != page or _not_run(command):
            continue
        command = _cpu_sized(_without_options_in_brackets(command))
        _needs(tmp_path, command, env)
        start = time.perf_counter()
        _run(tmp_path, command, env)
        timings.append((round(time.perf_counter() - start, 1), command[:80]))
        ran += 1
    print(page.name, ran, "commands", timings)


def test_every_command_shown_is_run_or_listed():
    """A command is run above unless NOT_RUN names it with a reason; the list has no
    stale entries."""
    used = set()
    for _, command in _shown_commands():
        for pattern, _, _ in NOT_RUN:
            if re.search(pattern, command):
                used.add(pattern)
    assert used == {p for p, _, _ in NOT_RUN}, {p for p, _, _ in NOT_RUN} - used
