"""Layer-mode pruning with ``executor=``: the layers' selection and refit run on an executor, the result is the
serial one.

Oracle: the same call without an executor (the serial loop). Models are float64, so that weights computed by the
same arithmetic compare at ``1e-12``; kept units, pick orders, report fields and warnings compare exactly.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import pickle
import sys
import threading
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest
import torch
from _torch_helpers import randomise_bn

import nn_adapters as nna
import nn_adapters._stats as nn_stats
import nn_adapters.cli as nn_cli
import nn_adapters.pruning as pruning
import nn_adapters.transformer as tr
from nn_adapters import zoo
from nn_adapters.cli import register

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def threads():
    with ThreadPoolExecutor(2) as pool:
        yield pool


@pytest.fixture(scope="module")
def processes():
    with ProcessPoolExecutor(2) as pool:
        yield pool


def _mlp():
    return zoo.mlp(12, [24, 16], 4)


def _cnn():  # conv -> conv, conv -> flatten -> linear, linear -> linear
    return randomise_bn(zoo.digits_cnn(channels=(6, 8), hidden=16))


def _resnet():
    return randomise_bn(zoo.resnet20(width=4))


def _se_net():  # squeeze-and-excitation gates on the way of conv -> conv pairs
    return randomise_bn(zoo.efficientnet_cifar(width_mult=0.25, stages=((1, 16, 1, 1, 3), (6, 24, 1, 2, 3)),
                                               head=32))


MODELS = {"mlp": (_mlp, (300, 12)), "mlp_few": (_mlp, (12, 12)), "cnn": (_cnn, (200, 1, 8, 8)),
          "resnet20": (_resnet, (16, 3, 16, 16)), "se": (_se_net, (24, 3, 16, 16))}


def _data(name, labels=False):
    shape = MODELS[name][1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (x, torch.randint(0, 4, (shape[0],), generator=g)) if labels else x


def _model(name):
    torch.manual_seed(0)
    return MODELS[name][0]().double().eval()


def _prune(name, executor, labels=False, **kw):
    """``nna.prune`` of a fresh float64 model ``name``, with the warnings it raised (their messages, in order)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Python >= 3.12 warns when a process pool forks a process that runs threads (torch's): the executor's
        # warning, not the pruning's, and absent from the serial run
        warnings.filterwarnings("ignore", message=r"This process .* is multi-threaded, use of fork\(\)",
                                category=DeprecationWarning)
        pruned, report = nna.prune(_model(name), _data(name, labels), executor=executor, **kw)
    return pruned, report, [str(w.message) for w in caught]


def _fields(report):
    """Every field of every layer's report except its time."""
    return [{k: v for k, v in vars(lr).items() if k != "time_s"} for lr in report.layers]


def assert_same_floats(a, b, path="report"):
    """``a == b`` for nested dicts/lists/tuples, floats to ``1e-12`` relative."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_floats(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_floats(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300), (path, a, b)
    else:
        assert a == b, (path, a, b)


def assert_same_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        scale = float(sa[k].abs().max()) if sa[k].numel() and sa[k].is_floating_point() else 0.0
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-12, atol=1e-12 * scale, msg=k)


def assert_same_as_serial(name, executor, labels=False, **kw):
    serial = _prune(name, None, labels, **kw)
    parallel = _prune(name, executor, labels, **kw)
    assert_same_models(serial[0], parallel[0])
    assert_same_floats(_fields(serial[1]), _fields(parallel[1]))
    assert serial[2] == parallel[2]  # the same warnings, in the same order
    rs, rp = serial[1].to_dict(), parallel[1].to_dict()
    for d in (rs, rp):
        del d["layers"], d["time_s"]
    assert rs == rp
    return serial[1]


CASES = [
    ("mlp", {"keep": 0.5}),
    ("mlp", {"keep": 0.4, "ridge": 1e-3, "verify": True}),
    ("cnn", {"compression": 2.0}),
    ("cnn", {"compression": 2.5, "allocation": "error"}),
    ("cnn", {"compression": 2.5, "allocation": "error", "ridge": 1e-2}),
    ("cnn", {"keep": {"0": 0.5, "3": 0.25}, "refit_prior": "zero"}),
    ("resnet20", {"keep": 0.5}),
    ("se", {"keep": 0.5}),
]


@pytest.mark.parametrize(("name", "kw"), CASES, ids=[f"{n}-{'-'.join(map(str, kw))}" for n, kw in CASES])
def test_layer_method_on_threads_is_the_serial_result(threads, name, kw):
    report = assert_same_as_serial(name, threads, method="layer", **kw)
    assert report.statistics == "layer" and all(lr.error_curve for lr in report.layers)


@pytest.mark.parametrize("method", nna.BASELINE_METHODS)
@pytest.mark.parametrize("ridge", ["cv", 1e-3])
def test_baselines_with_layer_statistics_on_threads_are_the_serial_result(threads, method, ridge):
    report = assert_same_as_serial("cnn", threads, labels=method == "actgrad", keep=0.5, method=method,
                                   refit_from="layer", ridge=ridge, seed=5)
    assert all(lr.ridge_choice == ("5-fold cv" if ridge == "cv" else "fixed") for lr in report.layers)


def test_random_baseline_draws_in_layer_order_whatever_the_completion_order(monkeypatch):
    """The pairs' jobs finish in reverse order; the random draws and the shrinking still follow the pairs."""
    job = pruning._pair_job
    names = [p.name for p in nna.find_pairs(_model("cnn"), _data("cnn")[:2])[0]]
    done = {name: threading.Event() for name in names}

    def last_first(st, *args):  # each job waits until the next pair's job has finished
        i = names.index(st.name)
        if i + 1 < len(names):
            assert done[names[i + 1]].wait(30)
        out = job(st, *args)
        done[st.name].set()
        return out

    serial = _prune("cnn", None, keep=0.5, method="random", refit_from="layer", seed=2)
    monkeypatch.setattr(pruning, "_pair_job", last_first)
    with ThreadPoolExecutor(len(names)) as pool:
        parallel = _prune("cnn", pool, keep=0.5, method="random", refit_from="layer", seed=2)
    assert all(e.is_set() for e in done.values())
    assert_same_models(serial[0], parallel[0])
    assert_same_floats(_fields(serial[1]), _fields(parallel[1]))


def test_every_pair_is_submitted_before_the_first_shrink(monkeypatch):
    events = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            events.append(("submit", args[0].__name__))  # the job, run by a wrapper with one BLAS thread
            return super().submit(fn, *args, **kwargs)

    shrink = pruning.keep_producer_side  # the first step of shrinking a pair's modules
    monkeypatch.setattr(pruning, "keep_producer_side", lambda *a: (events.append(("shrink", "")), shrink(*a))[1])
    with Recording(2) as pool:
        _, report, _ = _prune("cnn", pool, compression=2.0, method="layer", allocation="error")
    n = len(report.layers)
    assert events == [("submit", "_greedy")] * n + [("submit", "_pair_job")] * n + [("shrink", "")] * n


def test_process_pool_is_the_serial_result(processes):
    assert_same_as_serial("cnn", processes, compression=2.5, method="layer", allocation="error")
    assert_same_as_serial("mlp", processes, keep=0.5, method="random", refit_from="layer", seed=1)


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_statistics_with_torch_storage(monkeypatch, request, kind):
    """The statistics of a model on a GPU keep torch storage; forced on the CPU here: threads read them where
    they are, processes receive them pickled as numpy on the host. Both give the serial result of that path."""
    monkeypatch.setattr(nn_stats, "_DEVICE_PATH_ON_CPU", True)
    net = _model("cnn")
    pair = nna.find_pairs(net, _data("cnn")[:2])[0][0]
    st = nn_stats.PairStats(pair, net.get_submodule(pair.consumer), folds=5)
    st.update(torch.randn(20, 6, 8, 8, dtype=torch.float64))
    assert st.fold_accs[0].device is not None  # the device path is taken
    shipped = pickle.loads(pickle.dumps(st.fold_stats()))
    assert shipped.fold_accs[0].device is None and shipped.acc.device is None
    np.testing.assert_array_equal(shipped.acc.gram(), st.acc.gram())
    assert_same_as_serial("cnn", request.getfixturevalue(kind), compression=2.0, method="layer")


def test_dask_executor_is_the_serial_result():
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
        assert_same_as_serial("cnn", client.get_executor(), keep=0.5, method="layer")


@pytest.mark.parametrize("kw", [{"method": "asym"}, {"method": "seq"}, {"method": "random"},
                                {"method": "weight_norm", "refit_from": "seq"}])
def test_sequential_statistics_refuse_an_executor(threads, kw):
    with pytest.raises(ValueError, match=r"method='layer' \(refit_from='layer' for a baseline\)"):
        nna.prune(_model("mlp"), _data("mlp"), keep=0.5, executor=threads, **kw)


@pytest.mark.parametrize("bad", [object(), 2, "threads", ThreadPoolExecutor])
def test_a_non_executor_is_refused(bad):
    with pytest.raises(ValueError, match="must be a concurrent.futures.Executor"):
        nna.prune(_model("mlp"), _data("mlp"), keep=0.5, method="layer", executor=bad)


def test_the_callers_model_is_unchanged(threads):
    net = _model("cnn").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruned, _ = nna.prune(net, _data("cnn"), keep=0.5, method="layer", executor=threads)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and pruned.training
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_a_failing_job_names_its_pair_and_leaves_the_model_alone(threads, monkeypatch):
    job = pruning._pair_job

    def fail_on_second(st, *args):
        if st.name == "3->8":
            raise np.linalg.LinAlgError("singular matrix")
        return job(st, *args)

    monkeypatch.setattr(pruning, "_pair_job", fail_on_second)
    net = _model("cnn")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"pair 3->8 failed on ThreadPoolExecutor: LinAlgError: singular") as err:
        nna.prune(net, _data("cnn"), keep=0.5, method="layer", executor=threads)
    assert isinstance(err.value.__cause__, np.linalg.LinAlgError)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_statistics_that_do_not_pickle_are_named(processes, monkeypatch):
    monkeypatch.setattr(nn_stats.FoldStats, "__getstate__", lambda self: {"hook": lambda: None}, raising=False)
    with pytest.raises(ValueError, match=r"pair 0->3: the job and its statistics must pickle to run on "
                                         r"ProcessPoolExecutor.*lambda"):
        nna.prune(_model("cnn"), _data("cnn"), keep=0.5, method="layer", executor=processes)


def test_progress_bar_advances_as_in_the_serial_loop(threads, monkeypatch):
    logs = {}

    def recording_bar(total, desc, enabled):
        log = logs.setdefault(current, [])
        log.append((desc, total))

        class Bar:
            def update(self, n=1):
                log.append(("update", n))

            def close(self):
                log.append(("close",))
        return Bar()

    monkeypatch.setattr(pruning, "_progress_bar", recording_bar)
    for current in (None, threads):
        _prune("cnn", current, keep=0.5, method="layer", progress=True)
    n = len(nna.find_pairs(_model("cnn"), _data("cnn")[:2])[0])
    assert logs[None] == logs[threads]
    # the pairs' bar and the calibration bar (one batch), each advanced one step at a time and closed
    assert sorted(logs[None]) == sorted([("prune[layer]", n), ("calibration", 1)] + [("update", 1)] * (n + 1)
                                        + [("close",)] * 2)


def _blas_counts():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def test_jobs_run_on_one_blas_thread_and_the_count_is_given_back(threads, monkeypatch):
    """Every job sees one BLAS thread; after the call this process has its BLAS threads back (OpenBLAS ignores a
    worker thread that raises the count, so the calling thread must restore it)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    job, seen = pruning._pair_job, []

    def recording(*args):
        seen.append(_blas_counts())
        return job(*args)

    monkeypatch.setattr(pruning, "_pair_job", recording)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = _blas_counts()
        if not before or min(before) < 2:
            pytest.skip("no BLAS library running two threads here")
        _prune("cnn", threads, keep=0.5, method="layer")
        assert seen and all(max(c) == 1 for c in seen)
        assert _blas_counts() == before


_JOB = pruning._pair_job


def _job_on_one_blas_thread(*args):
    """The pair job, refusing to run unless BLAS runs one thread in its process (module-level: it pickles)."""
    counts = _blas_counts()
    if max(counts) != 1:
        raise AssertionError(f"the job runs with BLAS thread counts {counts}")
    return _JOB(*args)


def test_jobs_in_worker_processes_run_on_one_blas_thread(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    serial = _prune("mlp", None, keep=0.5, method="layer")
    monkeypatch.setattr(pruning, "_pair_job", _job_on_one_blas_thread)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        if min(_blas_counts() or [1]) < 2:
            pytest.skip("no BLAS library running two threads here")
        # forked now: the worker runs the patched job and starts on two BLAS threads
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            assert pool.submit(_blas_counts).result() == _blas_counts()
            parallel = _prune("mlp", pool, keep=0.5, method="layer")
    assert_same_models(serial[0], parallel[0])


def test_interpolation_warnings_are_the_serial_ones(threads):
    """12 samples and ridge 0: every refit interpolates and warns, in pair order."""
    report = assert_same_as_serial("mlp_few", threads, keep=0.75, method="layer", ridge=0.0)
    warned = _prune("mlp_few", threads, keep=0.75, method="layer", ridge=0.0)[2]
    assert [w.split(":")[0] for w in warned] == [f"pair {lr.pair}" for lr in report.layers]


# ---------------------------------------------------------------------------------------------------- transformers

transformers = pytest.importorskip("transformers")
from test_transformer_prune import tel_batches, tel_model, tiny_bert, token_batches  # noqa: E402


def _bert():
    return tiny_bert().double()


def _tel():
    return tel_model(norm_first=True).double()


def _tel_data():
    return [{k: (v.double() if v.is_floating_point() else v) for k, v in b.items()} for b in tel_batches()]


def _prune_transformer(build, data, executor, **kw):
    pruned, report = tr.prune_transformer(build(), data(), executor=executor, **kw)
    fields = [{k: v for k, v in vars(u).items() if k != "time_s"} for u in report.units]
    return pruned, report, fields


TRANSFORMER_CASES = [
    ({"target": "all", "method": "layer"}),
    ({"target": "ffn", "method": "layer", "ridge": 1e-3}),
    ({"target": "heads", "method": "layer", "refit_prior": "zero"}),
    ({"target": "all", "method": "layer", "allocation": "error-curve"}),
    ({"target": "all", "method": "layer", "keep": {0: 0.5}}),  # block 1, after a pruned one, is left as it is
    ({"target": "all", "method": "random", "propagation": "layer", "seed": 4}),
    ({"target": "all", "method": "wanda", "propagation": "layer"}),
    ({"target": "all", "method": "magnitude", "propagation": "layer"}),
]


@pytest.mark.parametrize("kw", TRANSFORMER_CASES, ids=[str(kw) for kw in TRANSFORMER_CASES])
@pytest.mark.parametrize(("build", "data"), [(_bert, lambda: token_batches(n_batches=3)), (_tel, _tel_data)],
                         ids=["bert", "torch"])
def test_transformer_layer_mode_on_threads_is_the_serial_result(threads, build, data, kw):
    kw = {"keep": 0.5, **kw}
    serial = _prune_transformer(build, data, None, **kw)
    parallel = _prune_transformer(build, data, threads, **kw)
    assert_same_models(serial[0], parallel[0])
    assert_same_floats(serial[2], parallel[2])
    assert serial[1].spec == parallel[1].spec and serial[1].block_forwards == parallel[1].block_forwards


def _bert_layer_mode_matches_serial(executor: object) -> tuple:
    """Prune the tiny BERT in layer mode serially and on ``executor``; assert the same models and floats."""
    kw = {"keep": 0.5, "target": "all", "method": "layer"}
    serial = _prune_transformer(_bert, lambda: token_batches(n_batches=3), None, **kw)
    parallel = _prune_transformer(_bert, lambda: token_batches(n_batches=3), executor, **kw)
    assert_same_models(serial[0], parallel[0])
    assert_same_floats(serial[2], parallel[2])
    return serial


def test_transformer_on_processes_and_through_prune(processes):
    serial = _bert_layer_mode_matches_serial(processes)
    via_prune, report = nna.prune(_bert(), token_batches(n_batches=3), keep=0.5, target="all", method="layer",
                                  executor=processes)
    assert_same_models(serial[0], via_prune)
    assert report.units[0].kept == serial[1].units[0].kept


def test_transformer_statistics_with_torch_storage_on_processes(processes, monkeypatch):
    """The device path (forced on the CPU): worker processes receive the statistics as host numpy."""
    monkeypatch.setattr(nn_stats, "_DEVICE_PATH_ON_CPU", True)
    _bert_layer_mode_matches_serial(processes)


def test_transformer_blocks_are_submitted_while_the_next_blocks_run(monkeypatch):
    """Block 0's jobs go to the executor before block 1's forward pass gathers its statistics."""
    events = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            events.append("submit")
            return super().submit(fn, *args, **kwargs)

    forward = tr._original_pass
    monkeypatch.setattr(tr, "_original_pass",
                        lambda oblk, *a, **kw: (events.append(oblk.name), forward(oblk, *a, **kw))[1])
    with Recording(2) as pool:
        tr.prune_transformer(_bert(), token_batches(n_batches=2), keep=0.5, target="all", method="layer",
                             executor=pool)
    assert events == ["encoder.layer.0", "submit", "submit", "encoder.layer.1", "submit", "submit"]


@pytest.mark.parametrize("kw", [{"method": "asym"}, {"method": "seq"}, {"method": "random"},
                                {"method": "wanda", "propagation": "seq"}])
def test_transformer_sequential_modes_refuse_an_executor(threads, kw):
    with pytest.raises(ValueError, match=r"method='layer' \(propagation='layer' for a baseline\)"):
        tr.prune_transformer(_bert(), token_batches(n_batches=2), executor=threads, **kw)
    with pytest.raises(ValueError, match="must be a concurrent.futures.Executor"):
        tr.prune_transformer(_bert(), token_batches(n_batches=2), method="layer", executor="pool")


def test_transformer_failing_job_names_its_block(threads, monkeypatch):
    def boom(*args):
        raise MemoryError("no room")

    monkeypatch.setattr(tr, "_stage_job", boom)
    with pytest.raises(RuntimeError, match=r"block 'encoder.layer.0' \(heads\) failed on ThreadPoolExecutor"):
        tr.prune_transformer(_bert(), token_batches(n_batches=2), target="all", method="layer", executor=threads)


# ----------------------------------------------------------------------------------------------------- command line

def _main(argv):
    parser = argparse.ArgumentParser(prog="submod")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_workers(tmp_path, monkeypatch):
    """--workers 2 gives the serial result, on spawned worker processes (a fork of this process, which runs
    torch's threads, can deadlock; Python >= 3.12 warns), which find the user's own module class by importing it."""
    (tmp_path / "parmodels.py").write_text(
        "import torch\nfrom nn_adapters import zoo\n"
        "class Net(torch.nn.Sequential):  # a class of the user's module: workers must import it\n"
        "    pass\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return Net(*zoo.mlp(12, [24, 16], 4)).double(), [torch.randn(200, 12, dtype=torch.float64)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    contexts = []

    class RecordingPool(ProcessPoolExecutor):
        def __init__(self, *a, **kw):
            contexts.append(kw.get("mp_context"))
            super().__init__(*a, **kw)

    monkeypatch.setattr(nn_cli, "ProcessPoolExecutor", RecordingPool)
    for workers, out in ((1, "serial.pt"), (2, "parallel.pt")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # no fork of a threaded process
            assert _main(["prune", "parmodels:build", "--keep", "0.5", "--method", "layer", "--workers",
                          str(workers), "--out", out]) == 0
    assert [c.get_start_method() for c in contexts] == ["spawn"]
    base = sys.modules["parmodels"].build()[0]
    assert_same_models(nna.load_pruned(tmp_path / "serial.pt", base_model=base),
                       nna.load_pruned(tmp_path / "parallel.pt", base_model=base))
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        _main(["prune", "parmodels:build", "--workers", "0"])
    with pytest.raises(ValueError, match="--workers 2 needs --method layer"):
        _main(["prune", "parmodels:build", "--workers", "2"])


def test_executor_type_is_any_submit(threads):
    """Anything with the Executor interface works, e.g. a subclass that counts the jobs."""

    class Counting(Executor):
        def __init__(self):
            self.n = 0

        def submit(self, fn, *args, **kwargs):
            self.n += 1
            return threads.submit(fn, *args, **kwargs)

    pool = Counting()
    _, report, _ = _prune("mlp", pool, keep=0.5, method="layer")
    assert pool.n == len(report.layers) == 2
