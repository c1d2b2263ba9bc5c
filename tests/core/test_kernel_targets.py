"""The CPU kernels built for another target than the host's (`QKVLAB_KERNEL_MARCH`).

The kernels are built with -march=native, so a test run checks only the host's spelling of the vector code. With
AVX-512 a 16-float vector is one register; with AVX2 alone it is two, and the lane shuffles are written apart for
that case (csrc/vec16.h). On an AVX-512 host the kernel tests run again built for x86-64-v3 (AVX2, no AVX-512).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from qkvlab.errors import QkvlabError
from qkvlab.nn import kv_decode

ROOT = Path(__file__).resolve().parents[2]
# The kernel tests: every kind of read against a reference, the few-row linear layer, whole native steps.
KERNEL_TESTS = ["tests/core/test_rotary_read.py", "tests/core/test_linear.py", "tests/core/test_decode_step.py"]
SELECTION = ("cpu_kernel or vectorised_read or two_streams or blocks or equals_f_linear or native_steps_equal "
             "or head_sizes or native_activations")


def _flags() -> set[str]:
    return set(kv_decode.cpuinfo_line(("flags",)).split())


@pytest.mark.parametrize("value", ["x86-64; rm -rf ~", "-O0", "a b"])
def test_a_bad_kernel_target_is_one_clear_error(value, monkeypatch):
    monkeypatch.setenv("QKVLAB_KERNEL_MARCH", value)
    with pytest.raises(QkvlabError, match="QKVLAB_KERNEL_MARCH=.*x86-64-v3") as err:
        kv_decode.flags()
    assert "\n" not in str(err.value)


def test_the_target_is_native_unless_named(monkeypatch):
    monkeypatch.delenv("QKVLAB_KERNEL_MARCH", raising=False)
    assert kv_decode.flags()[0] == "-march=native"
    monkeypatch.setenv("QKVLAB_KERNEL_MARCH", "x86-64-v3")
    assert kv_decode.flags()[0] == "-march=x86-64-v3"


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 targets")
def test_the_kernels_built_for_avx2_alone_pass_the_kernel_tests(tmp_path):
    flags = _flags()
    if not {"avx2", "fma", "f16c", "bmi2"} <= flags:
        pytest.skip("this CPU cannot run x86-64-v3 code")
    if "avx512f" not in flags:
        pytest.skip("the host has no AVX-512: its own build (the rest of the suite) is the AVX2 one")
    env = {**os.environ, "QKVLAB_KERNEL_MARCH": "x86-64-v3", "QKVLAB_KERNEL_DIR": str(tmp_path / "kernels")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", SELECTION,
                           *KERNEL_TESTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert list((tmp_path / "kernels").glob("kv_decode-*.so")), "no kernel was built for the target"
    assert " passed" in done.stdout and " failed" not in done.stdout
