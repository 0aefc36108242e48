"""The engine process keeps freed tensor memory for reuse: training stops faulting in fresh pages."""

import subprocess
import sys

import pytest

# Runs in a fresh process: the setting lasts for the life of a process.
FAULTS_PER_ITERATION = """
import resource, sys, torch
from loopscope.engine.allocator import tune_allocator
from loopscope.engine.plainloop import PlainLoop
from loopscope.scenarios.bench_models import wide_mlp_experiment
if sys.argv[1] == "tuned":
    assert tune_allocator()
torch.manual_seed(0)
experiment = wide_mlp_experiment()
device = torch.device("cpu")
loop = PlainLoop(experiment, device)
for _ in range(5):
    loop.step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    loop.step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30)
"""


def faults(mode: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_ITERATION, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return float(result.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_tuned_allocator_stops_page_faults_in_a_training_loop():
    default, tuned = faults("default"), faults("tuned")
    assert default > 100  # glibc's defaults: each iteration's activations land on fresh pages
    assert tuned < default / 10
