"""The demo's training loop (nn_adapters.digits.train_classifier): the trained network must not depend on the
machine it was trained on, since every published pruning result is measured on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nn_adapters import zoo
from nn_adapters.digits import load_digits_split, train_classifier


def _train(threads: int) -> dict[str, torch.Tensor]:
    Xtr, ytr = load_digits_split()[:2]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        net = train_classifier(zoo.digits_cnn(), Xtr[:320], ytr[:320], epochs=3, seed=0)
    finally:
        torch.set_num_threads(before)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_training_does_not_depend_on_the_number_of_threads():
    # float32 training on 1 and 2 threads rounds reductions differently, and the weights drift apart (this test
    # failed on the float32 loop); float64 training agrees to rounding, one float32 ulp at most after the cast back
    one, two = _train(1), _train(2)
    for k in one:
        if one[k].is_floating_point():
            torch.testing.assert_close(two[k], one[k], rtol=2.5e-7, atol=1e-12, msg=k)
        else:
            assert torch.equal(two[k], one[k])


def test_training_keeps_the_model_dtype_and_parameters():
    net = zoo.digits_cnn()
    params = list(net.parameters())
    X, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    out = train_classifier(net, X, y, epochs=1)
    assert out is net and not out.training
    assert all(p.dtype == torch.float32 for p in (*net.parameters(), *net.buffers()) if p.is_floating_point())
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]  # trained in place
    assert X.dtype == torch.float32  # the caller's data untouched


def test_training_refuses_mixed_dtypes():
    net = zoo.digits_cnn()
    net[0].double()
    with pytest.raises(ValueError, match="several dtypes"):
        train_classifier(net, torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), epochs=1)


_AVX512 = sys.platform == "linux" and "avx512f" in Path("/proc/cpuinfo").read_text(errors="ignore")


@pytest.mark.skipif(not _AVX512, reason="needs a Linux CPU with AVX-512 to compare against its AVX2 kernels")
def test_training_does_not_depend_on_the_cpu_vector_instructions(tmp_path):
    # the same training in a process restricted to AVX2 kernels (ATen, oneDNN, MKL), as on an older CPU
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "import test_nn_digits as t\n"
        "torch.save(t._train(1), sys.argv[1])\n")
    # the subprocess must import this checkout (not an installed copy elsewhere): put its root on the path
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = tmp_path / "avx2.pt"
    subprocess.run([sys.executable, str(script), str(out), str(Path(__file__).parent)], env=env, check=True,
                   timeout=300)
    avx2, here = torch.load(out, weights_only=True), _train(1)
    for k in here:
        if here[k].is_floating_point():
            torch.testing.assert_close(avx2[k], here[k], rtol=2.5e-7, atol=1e-12, msg=k)


def test_training_that_fails_gives_the_model_its_dtype_back():
    net = zoo.digits_cnn()
    with pytest.raises(IndexError):  # 8 images, 7 labels
        train_classifier(net, torch.rand(8, 1, 8, 8), torch.randint(0, 10, (7,)), epochs=1)
    assert all(t.dtype == torch.float32 for t in (*net.parameters(), *net.buffers()) if t.is_floating_point())
