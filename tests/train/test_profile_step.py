"""scripts/profile_step.py: the trainer's steps under torch.profiler, on the CPU here."""

import subprocess
import sys
from pathlib import Path

from tiny_runs import tiny_config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "profile_step.py"


def test_the_steps_are_timed_and_their_operations_listed(tmp_path, tiny_data):
    config = tiny_config(tmp_path, tiny_data)
    done = subprocess.run([sys.executable, str(SCRIPT), str(config), "--steps", "3", "--rows", "5",
                           "--set", "train.optimizer.lr=1e-3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("step ") and lines[0].endswith(" ms")
    assert lines[1].startswith("step ") and lines[1].endswith("ms under the profiler, 3 steps")
    assert "Self CPU" in done.stdout
    # Five operations: the table's rows between its header rule and its closing rule.
    rules = [i for i, line in enumerate(lines) if set(line.strip()) == {"-", " "} or set(line) == {"-"}]
    assert rules[-1] - rules[-2] - 1 == 5


def test_a_bad_step_count_is_refused_in_one_line(tmp_path, tiny_data):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tiny_config(tmp_path, tiny_data)), "--steps", "0"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr == "error: --steps 0: expected a positive number\n"
