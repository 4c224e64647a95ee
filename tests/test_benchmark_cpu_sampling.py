"""benchmarks/synthetic.run_measured: the sampled CPU seconds count a process whose parent ignores SIGCHLD (as Ray's
raylet does with its workers), which RUSAGE_CHILDREN never sees (benchmarks/bam_round_speed.py relies on this)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic import run_measured  # noqa: E402

BURN_S = 1.0

# the parent ignores SIGCHLD, so the kernel reaps the grandchild and adds its time to no one's rusage
PARENT = textwrap.dedent(f"""
    import signal, subprocess, sys
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    burn = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < {BURN_S}: pass"
    subprocess.Popen([sys.executable, "-c", burn]).wait()
""")


def test_sampled_cpu_counts_what_rusage_children_misses(tmp_path):
    result = run_measured([sys.executable, "-c", PARENT], tmp_path / "run")
    assert result.ok, result.stderr
    assert result.cpu_s < BURN_S / 2  # the two interpreters' start-up only: the burn is missing
    # the burn is there, less at most its last sampling interval (wider under load)
    assert result.sampled_cpu_s > result.cpu_s + BURN_S * 0.6
