"""Every Triton kernel compiles for sm_80, sm_89, sm_90 and sm_100, fits the arch's shared memory
and does not spill registers, for the configs its autotuner can pick there
(tests/compile_kernels.py, no GPU needed). A subprocess: this suite's kernels are the
interpreter's, which cannot be compiled. Default: one representative (largest) config per
kernel and arch; TRITONPRESS_SLOW_TESTS=1 compiles every variant and config (about 10 minutes
on 2 cores)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_kernels.py")
SLOW = os.environ.get("TRITONPRESS_SLOW_TESTS") == "1"


def _compile(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        r = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"compile_kernels.py {' '.join(args)} ran over {timeout} s")
    return r.returncode, r.stdout + r.stderr


@pytest.mark.timeout(1800 if SLOW else 600)
def test_every_kernel_compiles_fits_shared_memory_and_does_not_spill():
    rc, out = _compile(*(["--all"] if SLOW else []), timeout=1700 if SLOW else 540)
    failing = "\n".join(l for l in out.splitlines() if l.startswith(("FAIL", "     ", "Trace")))
    assert rc == 0, f"{failing}\n...\n{out[-3000:]}"
    assert "kernels never launched: none" in out


@pytest.mark.timeout(300)
def test_the_check_rejects_a_tile_too_big_and_one_that_spills():
    rc, out = _compile("--selftest", "--arch", "80", timeout=280)
    assert rc == 1, out[-3000:]
    assert "B shared memory, sm_80 has" in out, out[-3000:]
    assert "B/thread (bound 0)" in out, out[-3000:]
