"""Partitioned greedy (GreeDi) against brute force and the theorems it rests on; restrictions against their
definitions computed from the data; executors (processes, Dask) against the serial run; bad input."""

import contextlib
import itertools
import math
import pickle
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import submod

E = 1 - 1 / math.e


def brute_opt(f, k):
    return max(f.value(list(S)) for r in range(k + 1) for S in itertools.combinations(range(f.n), r))


def tol(x):
    return 1e-9 * max(1.0, abs(x))


def sq_distance_similarity(X):
    """K = max(D) - D with D the squared Euclidean distances, from the definition (no library code)."""
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(axis=2)
    return D.max() - D


@st.composite
def instances(draw):
    """Small instances of every built-in submodular objective, from a drawn seed."""
    n = draw(st.integers(2, 7))
    kind = draw(st.sampled_from(["facility", "facility-X", "sparse-facility", "feature", "coverage", "logdet",
                                 "graphcut", "modular", "sum"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "facility":
        return submod.FacilityLocation(similarity=rng.random((n, n)))
    if kind == "facility-X":
        return submod.FacilityLocation(rng.standard_normal((n, 2)))
    if kind == "sparse-facility":
        return submod.FacilityLocation(similarity=sp.csr_matrix(np.where(rng.random((n, n)) < 0.5,
                                                                         rng.random((n, n)), 0.0)))
    if kind == "feature":
        return submod.FeatureBased(rng.random((n, 3)), concave=draw(st.sampled_from(["sqrt", "log1p", "inverse"])))
    if kind == "coverage":
        return submod.Coverage(rng.random((n, 6)) < 0.4, weights=rng.random(6))
    if kind == "logdet":
        return submod.LogDeterminant(rng.standard_normal((n, 3)), ridge=0.5)
    if kind == "graphcut":
        A = rng.random((n, n))
        return submod.GraphCut(similarity=A + A.T, lam=0.4)
    if kind == "modular":
        return submod.Modular(rng.random(n))
    return submod.FeatureBased(rng.random((n, 2))) + 0.5 * submod.FacilityLocation(similarity=rng.random((n, n)))


# ------------------------------------------------------------------------------------------ one part = maximize
@pytest.mark.parametrize("method", submod.METHODS)
def test_one_part_is_maximize(method):
    rng = np.random.default_rng(0)
    objectives = [submod.FacilityLocation(rng.standard_normal((120, 3))),
                  submod.SparseRegression(rng.standard_normal((80, 30)), rng.standard_normal(80)),
                  submod.Coverage(rng.random((60, 20)) < 0.2)]
    for f in objectives:
        a = submod.maximize(f, 8, method=method, seed=5)
        b = submod.maximize_distributed(f, 8, n_parts=1, method=method, seed=5)
        np.testing.assert_array_equal(b.selected, a.selected)
        np.testing.assert_array_equal(b.values, a.values)
        np.testing.assert_array_equal(b.gains, a.gains)
        assert b.value == a.value and b.n_evaluations == a.n_evaluations
        assert b.certificate == a.certificate
        assert b.distributed.n_parts == 1 and b.distributed.winner == "whole"


def test_one_part_works_without_restrict():
    """With one part nothing is restricted, so a function without restrict runs (it is maximize)."""
    f = _NoRestrict(4)
    res = submod.maximize_distributed(f, 2, n_parts=1)
    assert res.value == 2.0


# ------------------------------------------------------------------------------------------ guarantees
@settings(max_examples=60, deadline=None)
@given(instances(), st.data())
def test_worst_case_bound_for_every_partition_and_certificate_bounds_opt(f, data):
    """Every partition: F(result) >= (1 - 1/e) / min(m, k) OPT_k (subadditivity + greedy on the part holding the
    best piece of OPT); the certificate, on the full F, is >= the brute-force OPT and >= the value."""
    k = data.draw(st.integers(1, f.n))
    m = data.draw(st.integers(1, f.n))
    labels = np.array(data.draw(st.lists(st.integers(0, m - 1), min_size=f.n, max_size=f.n)))
    opt = brute_opt(f, k)
    for method in ("greedy", "lazy"):
        res = submod.maximize_distributed(f, k, n_parts=m, partition=labels, method=method)
        assert res.value >= E / min(m, k) * opt - tol(opt)
        assert res.value <= opt + tol(opt)
        assert res.value == pytest.approx(f.value(res.selected), rel=1e-9, abs=1e-9)
        assert res.certificate is not None
        assert res.certificate.upper_bound >= opt - tol(opt)
        assert res.certificate.upper_bound >= res.value
        assert res.selected.size <= k and np.unique(res.selected).size == res.selected.size


@settings(max_examples=12, deadline=None)
@given(instances(), st.data())
def test_expected_value_over_the_random_partition_meets_barbosa_et_al(f, data):
    """E[F(result)] >= (1 - 1/e) / 2 OPT_k over the uniform independent partition (Barbosa et al. 2015), computed
    exactly: every one of the m^n labelings is equally likely, so the expectation is their average."""
    n = min(f.n, 5)
    f = f.restrict(np.arange(n)) if n < f.n else f
    m = data.draw(st.integers(2, min(3, n)))
    k = data.draw(st.integers(1, n))
    opt = brute_opt(f, k)
    values = [submod.maximize_distributed(f, k, partition=np.array(lab), n_parts=m, certificate_prefixes=0).value
              for lab in itertools.product(range(m), repeat=n)]
    assert np.mean(values) >= E / 2 * opt - tol(opt)


def test_an_objective_where_no_part_finds_a_gain_selects_nothing():
    # Every part stops at once (all gains 0), so the union of the part solutions is empty; the second round used
    # to restrict f to no element and raise (found by the property test above with a zero similarity).
    f = submod.FacilityLocation(similarity=np.zeros((4, 4)))
    for labels in ([0, 0, 0, 0], [0, 1, 0, 1]):
        res = submod.maximize_distributed(f, 2, n_parts=2, partition=np.array(labels))
        assert res.selected.size == 0 and res.value == 0.0
        assert res.certificate is not None and res.certificate.upper_bound >= 0.0


def test_an_objective_that_does_not_pickle_gets_a_clear_error_on_a_process_pool():
    # A lambda inside from_callable cannot be sent to a worker process; this was a raw PicklingError.
    from concurrent.futures import ProcessPoolExecutor

    w = np.arange(1.0, 9.0)
    f = submod.from_callable(lambda S: float(np.sqrt(w[list(S)].sum())), 8, submodular=True)
    with ProcessPoolExecutor(1) as pool, pytest.raises(ValueError, match="module-level function, not a lambda"):
        submod.maximize_distributed(f, 2, n_parts=2, seed=0, executor=pool)
    assert submod.maximize_distributed(f, 2, n_parts=2, seed=0).selected.size == 2  # fine in this process


class _LockedModular(submod.Modular):
    """A modular function whose parts hold a lock (it cannot pickle: 'cannot pickle '_thread.lock' object')."""

    def restrict(self, indices, *, local=False):
        g = submod.Modular.restrict(self, indices)
        g.lock = threading.Lock()
        return g


@pytest.mark.parametrize("where", ["processes", "dask"])
def test_an_objective_with_an_attribute_that_does_not_pickle_gets_the_clear_error(where, request):
    # Python says TypeError for a lock, a generator or an open file: it went through raw on a process pool, and
    # Dask, which pickles when a part is submitted, raised TypeError('Could not serialize object of type
    # LLGExpr', ...) without naming the lock.
    f = _LockedModular(np.arange(1.0, 9.0))
    with contextlib.ExitStack() as stack:
        pool = (stack.enter_context(ProcessPoolExecutor(1)) if where == "processes"
                else request.getfixturevalue("dask_executor"))
        with pytest.raises(ValueError, match=r"must pickle to run on .*\(TypeError: cannot pickle '_thread.lock'"):
            submod.maximize_distributed(f, 2, n_parts=2, seed=0, executor=pool)
    assert submod.maximize_distributed(f, 2, n_parts=2, seed=0).selected.tolist() == [7, 6]  # fine here


_STARTED: list[int] = []


class _FirstPartFails(submod.Modular):
    """The first part's objective raises in the worker; every other part records that it ran."""

    def restrict(self, indices, *, local=False):
        first = not getattr(self, "_restricted", False)
        self._restricted = True
        return _FailingPart(np.ones(len(indices))) if first else _SlowPart(np.ones(len(indices)))


class _FailingPart(submod.Modular):
    def init_state(self):
        raise RuntimeError("this part's objective is broken")


class _SlowPart(submod.Modular):
    def init_state(self):
        _STARTED.append(1)
        time.sleep(0.05)
        return super().init_state()


def test_a_failing_part_cancels_the_parts_that_have_not_started():
    # The error went back to the caller while the other parts stayed queued on the caller's executor and ran
    # after the call had failed (with many parts on a busy pool: minutes of work for nothing).
    _STARTED.clear()
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(RuntimeError, match="this part's objective is broken"):
            submod.maximize_distributed(_FirstPartFails(np.ones(40)), 2, n_parts=8, partition=np.arange(40) % 8,
                                        executor=pool)
    assert len(_STARTED) <= 1  # the part the worker may have taken before the caller saw the error


def test_pickling_errors_are_found_behind_the_errors_raised_from_them():
    from submod._validation import pickling_error

    lock = TypeError("cannot pickle '_thread.lock' object")
    try:
        raise TypeError("Could not serialize object of type LLGExpr", "LLGExpr(...)") from lock  # as Dask does
    except TypeError as dask_error:
        assert pickling_error(dask_error) is lock
    assert pickling_error(pickle.PicklingError("Can't pickle <lambda>")) is not None
    assert pickling_error(AttributeError("Can't pickle local object 'f.<locals>.g'")) is not None
    assert pickling_error(TypeError("unsupported operand type(s)")) is None
    assert pickling_error(RuntimeError("cannot pickle, says the user's own code")) is None


def test_the_random_partition_is_uniform_and_independent():
    """Part sizes over many seeds: each element lands in each of m parts with probability 1/m (mean size n/m,
    binomial variance n (1/m)(1 - 1/m)); a balanced split would have variance ~0."""
    f = submod.Modular(np.ones(60))
    sizes = np.array([submod.maximize_distributed(f, 2, n_parts=3, seed=s, certificate_prefixes=0)
                      .distributed.part_sizes for s in range(300)])
    assert sizes.sum(axis=1).tolist() == [60] * 300
    assert np.allclose(sizes.mean(axis=0), 20, atol=1.0)
    assert 60 * (1 / 3) * (2 / 3) * 0.7 < sizes[:, 0].var() < 60 * (1 / 3) * (2 / 3) * 1.3


def test_sparse_regression_certificate_needs_a_proven_gamma():
    verification = pytest.importorskip("verification")
    rng = np.random.default_rng(3)
    A = rng.standard_normal((40, 8))
    A[:, 1] = A[:, 0] + 0.3 * rng.standard_normal(40)          # correlated columns: not submodular
    y = A[:, 0] - A[:, 1] + 0.1 * rng.standard_normal(40)
    f = submod.SparseRegression(A, y)
    res = submod.maximize_distributed(f, 3, n_parts=2, seed=0)
    assert res.certificate is None                             # gamma = 1 would be unsound here
    gamma = verification.submodularity_ratio(f, 3, method="spectral").value
    res = submod.maximize_distributed(f, 3, n_parts=2, seed=0, gamma_lower=gamma)
    opt = brute_opt(f, 3)
    assert res.certificate.upper_bound >= opt - tol(opt) and res.certificate.gamma_lower == gamma
    assert res.value <= opt + tol(opt)


# ------------------------------------------------------------------------------------------ restrictions
def lstsq_value(A, Y, cols):
    if len(cols) == 0:
        return 0.0
    coef, *_ = np.linalg.lstsq(A[:, cols], Y, rcond=None)
    return float((Y ** 2).sum() - ((Y - A[:, cols] @ coef) ** 2).sum())


def subsets(n, max_size=3):
    for r in range(max_size + 1):
        yield from itertools.combinations(range(n), r)


@pytest.mark.parametrize("groups", [None, [[0, 1], [2], [3, 4, 5], [6], [7, 8]]])
def test_sparse_regression_restriction_is_exact(groups):
    rng = np.random.default_rng(1)
    A, Y = rng.standard_normal((50, 9)), rng.standard_normal((50, 2))
    f = submod.SparseRegression(A, Y, groups=groups)
    units = [[j] for j in range(9)] if groups is None else groups
    idx = np.array([3, 0, 4]) if groups else np.array([7, 2, 5, 0])
    g = f.restrict(idx)
    assert g.n == idx.size
    for S in subsets(idx.size):
        cols = [c for s in S for c in units[idx[s]]]
        assert g.value(list(S)) == pytest.approx(lstsq_value(A, Y, cols), rel=1e-9, abs=1e-9)


def test_sparse_regression_restriction_keeps_ridge_intercept_and_from_gram():
    rng = np.random.default_rng(2)
    A, Y = rng.standard_normal((60, 7)) + 3.0, rng.standard_normal((60, 2))
    idx = np.array([6, 1, 3])
    for f in [submod.SparseRegression(A, Y, ridge=0.5, fit_intercept=True),
              submod.SparseRegression.from_gram(A.T @ A, A.T @ Y, float((Y ** 2).sum()), ridge=0.5)]:
        g = f.restrict(idx)
        for S in subsets(3):
            assert g.value(list(S)) == pytest.approx(f.value(idx[list(S)]), rel=1e-10, abs=1e-10)
    # ridge + intercept from its definition: the augmented, centred least squares
    Ac, Yc = A - A.mean(axis=0), Y - Y.mean(axis=0)
    aug_A = np.vstack([Ac[:, [6, 3]], math.sqrt(0.5) * np.eye(2)])
    aug_Y = np.vstack([Yc, np.zeros((2, 2))])
    g = submod.SparseRegression(A, Y, ridge=0.5, fit_intercept=True).restrict(idx)
    assert g.value([0, 2]) == pytest.approx(lstsq_value(aug_A, aug_Y, [0, 1]), rel=1e-9)


def facility_oracle(K, items, cand, S):
    return float(sum(max((K[i, cand[s]] for s in S), default=0.0) for i in items))


@pytest.mark.parametrize("build", ["dense", "asymmetric", "sparse", "features", "cosine"])
def test_facility_location_restriction_exact_and_local(build):
    rng = np.random.default_rng(4)
    n = 9
    X = rng.standard_normal((n, 3))
    if build == "dense":
        K = sq_distance_similarity(X)
        f = submod.FacilityLocation(similarity=K)
    elif build == "asymmetric":
        K = rng.random((n, n))
        f = submod.FacilityLocation(similarity=K)
    elif build == "sparse":
        K = np.where(rng.random((n, n)) < 0.4, rng.random((n, n)), 0.0)
        f = submod.FacilityLocation(similarity=sp.csr_matrix(K))
    elif build == "features":
        K = sq_distance_similarity(X)
        f = submod.FacilityLocation(X)
    else:
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        K = 1.0 + Xn @ Xn.T
        f = submod.FacilityLocation(X, metric="cosine")
    idx = np.array([5, 2, 8, 0])
    exact = pickle.loads(pickle.dumps(f.restrict(idx)))       # what a worker receives
    local = pickle.loads(pickle.dumps(f.restrict(idx, local=True)))
    for S in subsets(idx.size, 4):
        assert exact.value(list(S)) == pytest.approx(facility_oracle(K, range(n), idx, S), rel=1e-10, abs=1e-10)
        assert local.value(list(S)) == pytest.approx(facility_oracle(K, idx, idx, S), rel=1e-10, abs=1e-10)
    # a restriction of a restriction keeps every item and fewer candidates
    again = exact.restrict([3, 1])
    assert again.value([0, 1]) == pytest.approx(facility_oracle(K, range(n), idx[[3, 1]], [0, 1]), rel=1e-10)


def test_facility_location_from_features_ships_features_not_similarities():
    X = np.random.default_rng(5).standard_normal((2000, 4))
    f = submod.FacilityLocation(X)
    part = np.arange(0, 2000, 4)
    exact, local = f.restrict(part), f.restrict(part, local=True)
    # the pickles hold X (2000 x 4 floats), not the 2000 x 500 (or 500 x 500) similarity block
    assert len(pickle.dumps(exact)) < 2 * X.nbytes and len(pickle.dumps(local)) < 2 * X.nbytes
    assert exact.value([0, 7]) == pytest.approx(f.value(part[[0, 7]]), rel=1e-10)
    assert len(pickle.dumps(exact)) < 2 * X.nbytes         # still small after use
    # the local objective needs only the part's rows of X, as the docstring says (it shipped all of X)
    assert len(pickle.dumps(local)) < 2 * X[part].nbytes
    np.testing.assert_allclose(local.similarity, sq_distance_similarity(X)[np.ix_(part, part)], rtol=1e-9,
                               atol=1e-9)


def test_other_objectives_restrictions_equal_their_definitions():
    rng = np.random.default_rng(6)
    n = 8
    idx = np.array([6, 1, 3, 4])
    X = rng.random((n, 3))
    w = rng.random(3)
    cases = [(submod.FeatureBased(X, concave="log1p", weights=w),
              lambda S: float((w * np.log1p(X[idx[list(S)]].sum(axis=0))).sum()))]
    M = rng.random((n, 5)) < 0.4
    cw = rng.random(5)
    cases.append((submod.Coverage(M, weights=cw), lambda S: float(cw[M[idx[list(S)]].any(axis=0)].sum())))
    Z = rng.standard_normal((n, 3))
    Kz = Z @ Z.T
    cases.append((submod.LogDeterminant(Z, ridge=0.7),
                  lambda S: float(np.log(np.linalg.det(np.eye(len(S)) + Kz[np.ix_(idx[list(S)], idx[list(S)])]
                                                        / 0.7)))))
    B = rng.random((n, n))
    Kg = B + B.T
    cases.append((submod.GraphCut(similarity=Kg, lam=0.3),
                  lambda S: float(Kg[:, idx[list(S)]].sum() - 0.3 * Kg[np.ix_(idx[list(S)], idx[list(S)])].sum())))
    mw = rng.random(n)
    cases.append((submod.Modular(mw), lambda S: float(mw[idx[list(S)]].sum())))
    Kf = rng.random((n, n))
    cases.append((submod.Modular(mw) + 2.0 * submod.FacilityLocation(similarity=Kf),
                  lambda S: float(mw[idx[list(S)]].sum()) + 2.0 * facility_oracle(Kf, range(n), idx, S)))
    cases.append((submod.from_callable(lambda S: float(np.sqrt(mw[S].sum())), n, submodular=True),
                  lambda S: float(np.sqrt(mw[idx[list(S)]].sum()))))
    for f, oracle in cases:
        g = f.restrict(idx)
        assert g.n == idx.size and g.submodular == f.submodular
        for S in subsets(idx.size, 4):
            assert g.value(list(S)) == pytest.approx(oracle(S), rel=1e-10, abs=1e-10), type(f).__name__


# ------------------------------------------------------------------------------------------ the result
def test_result_fields_are_those_of_the_full_objective():
    rng = np.random.default_rng(7)
    f = submod.FacilityLocation(rng.standard_normal((300, 4)))
    res = submod.maximize_distributed(f, 12, n_parts=5, seed=3)
    info = res.distributed
    assert res.selected.size == 12 and res.values[-1] == pytest.approx(f.value(res.selected), rel=1e-12)
    np.testing.assert_allclose(res.values, [f.value(res.selected[:t]) for t in range(1, 13)], rtol=1e-12)
    np.testing.assert_allclose(res.gains, np.diff(np.concatenate([[0.0], res.values])), rtol=1e-12)
    assert info.part_sizes.sum() == 300 and info.n_parts == 5
    assert res.value == max(info.union_value, info.part_values.max())
    assert info.winner in ("union", "part") and (info.winner == "part") == (info.winner_part is not None)
    assert info.certified_prefixes == (0, 6, 12)
    assert res.certificate.prefix_size in info.certified_prefixes
    assert "n_parts=5" in repr(res)


def test_evaluations_add_up_over_parts_second_round_and_certificate():
    rng = np.random.default_rng(8)
    f = submod.FeatureBased(rng.random((90, 4)))
    labels = rng.integers(0, 3, 90)
    res = submod.maximize_distributed(f, 5, partition=labels, method="greedy", certificate_prefixes=2)
    parts = [np.flatnonzero(labels == i) for i in range(3)]
    sols = [p[submod.maximize(f.restrict(p), 5, method="greedy").selected] for p in parts]
    part_evals = sum(submod.maximize(f.restrict(p), 5, method="greedy").n_evaluations for p in parts)
    union = np.unique(np.concatenate(sols))
    second = submod.maximize(f.restrict(union), 5, method="greedy")
    assert res.distributed.union_size == union.size
    assert res.n_evaluations == part_evals + second.n_evaluations + 2 * 90


def test_certificate_prefixes_choose_the_cost():
    f = submod.FacilityLocation(np.random.default_rng(9).standard_normal((200, 3)))
    none = submod.maximize_distributed(f, 6, n_parts=3, seed=0, certificate_prefixes=0)
    final = submod.maximize_distributed(f, 6, n_parts=3, seed=0, certificate_prefixes=1)
    assert none.certificate is None and none.distributed.certified_prefixes == ()
    assert final.distributed.certified_prefixes == (6,) and final.n_evaluations == none.n_evaluations + 200
    np.testing.assert_array_equal(none.selected, final.selected)


def test_certificate_prefixes_larger_than_the_set_certify_every_prefix():
    # 10**12 asked np.linspace for 10**12 sizes (MemoryError: 7.28 TiB) to certify a set of 3 elements.
    f = submod.Modular(np.arange(20.0))
    res = submod.maximize_distributed(f, 3, n_parts=2, seed=0, certificate_prefixes=10**12)
    assert res.distributed.certified_prefixes == (0, 1, 2, 3)
    assert res.certificate.upper_bound >= 19 + 18 + 17 - 1e-9   # OPT of a modular function: the 3 largest weights


def test_seed_makes_the_partition_reproducible():
    f = submod.FacilityLocation(np.random.default_rng(10).standard_normal((150, 3)))
    a = submod.maximize_distributed(f, 5, n_parts=4, seed=11)
    b = submod.maximize_distributed(f, 5, n_parts=4, seed=11)
    np.testing.assert_array_equal(a.selected, b.selected)
    np.testing.assert_array_equal(a.distributed.part_sizes, b.distributed.part_sizes)
    sizes = {tuple(submod.maximize_distributed(f, 5, n_parts=4, seed=s).distributed.part_sizes) for s in range(5)}
    assert len(sizes) > 1


def test_local_objective_still_gets_a_sound_certificate():
    rng = np.random.default_rng(12)
    X = rng.standard_normal((10, 2))
    f = submod.FacilityLocation(X)
    res = submod.maximize_distributed(f, 3, n_parts=3, seed=1, local=True)
    opt = brute_opt(f, 3)
    assert res.distributed.objective == "local"
    assert res.value <= opt + tol(opt) <= res.certificate.upper_bound + 2 * tol(opt)


# ------------------------------------------------------------------------------------------ executors
def _executor_cases():
    rng = np.random.default_rng(13)
    A = rng.standard_normal((100, 40))
    return [(submod.FacilityLocation(rng.standard_normal((400, 3))), {}),
            (submod.FacilityLocation(rng.standard_normal((400, 3))), {"local": True}),
            (submod.FacilityLocation(similarity=sp.random(300, 300, density=0.05, random_state=1, format="csr")), {}),
            (submod.SparseRegression(A, A[:, :5] @ rng.standard_normal(5), groups=2), {"method": "greedy"}),
            (submod.FeatureBased(rng.random((200, 5)), concave="inverse"), {"method": "stochastic"})]


def test_process_pool_gives_the_serial_result():
    cases = _executor_cases()
    with ProcessPoolExecutor(2) as pool:
        for f, kw in cases:
            serial = submod.maximize_distributed(f, 6, n_parts=3, seed=2, **kw)
            par = submod.maximize_distributed(f, 6, n_parts=3, seed=2, executor=pool, **kw)
            np.testing.assert_array_equal(par.selected, serial.selected)
            np.testing.assert_allclose(par.values, serial.values, rtol=1e-12)
            assert par.n_evaluations == serial.n_evaluations
            assert par.distributed.winner == serial.distributed.winner


def test_thread_pool_gives_the_serial_result():
    f, _ = _executor_cases()[0]
    with ThreadPoolExecutor(2) as pool:
        par = submod.maximize_distributed(f, 6, n_parts=3, seed=2, executor=pool)
    np.testing.assert_array_equal(par.selected, submod.maximize_distributed(f, 6, n_parts=3, seed=2).selected)


def test_a_thread_pool_leaves_the_warning_filters_alone():
    # Parts on worker threads used warnings.catch_warnings, which is not thread-safe: the interleaved saves and
    # restores left NonMonotoneWarning and StaleBoundWarning ignored for the whole process afterwards.
    import warnings

    f = submod.FacilityLocation(np.random.default_rng(0).random((200, 3)))
    before = list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        for seed in range(5):
            submod.maximize_distributed(f, 3, n_parts=64, seed=seed, executor=pool, certificate_prefixes=0)
            assert warnings.filters == before
    g = submod.from_callable(lambda S: float(len(S) - 0.3 * len(S) ** 2), 10, submodular=True)
    with pytest.warns(submod.optimize.NonMonotoneWarning):
        submod.maximize(g, 5)


@pytest.fixture(scope="module")
def dask_executor():
    """One in-process Dask cluster for the module's tests (a cluster takes seconds to start)."""
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        yield client.get_executor()


def test_dask_executor_gives_the_serial_result(dask_executor):
    f, _ = _executor_cases()[0]
    par = submod.maximize_distributed(f, 6, n_parts=3, seed=2, executor=dask_executor)
    np.testing.assert_array_equal(par.selected, submod.maximize_distributed(f, 6, n_parts=3, seed=2).selected)


# ------------------------------------------------------------------------------------------ bad input
class _NoRestrict(submod.SetFunction):
    submodular = True

    def init_state(self):
        return submod.Modular(np.ones(self.n)).init_state()


@pytest.mark.parametrize("kwargs, match", [
    ({"n_parts": 0}, "n_parts must be an integer between 1"),
    ({"n_parts": 11}, "n_parts must be an integer between 1"),
    ({"n_parts": True}, "n_parts must be an integer"),
    ({}, "pass n_parts"),
    ({"partition": np.zeros(9, dtype=int)}, r"shape \(10,\)"),
    ({"partition": np.zeros(10)}, "integer array"),
    ({"partition": -np.ones(10, dtype=int)}, "non-negative"),
    ({"partition": np.arange(10) % 4, "n_parts": 3}, "n_parts = 3"),
    ({"partition": [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]]}, r"labels\[part\] = i"),   # was numpy's 'inhomogeneous'
    ({"partition": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}, r"labels\[part\] = i"),
    ({"partition": np.repeat([0, 50], 5)}, "uses part number 50 .* renumber"),
    ({"n_parts": 2, "method": "fast"}, "unknown method"),
    ({"n_parts": 2, "constraint": submod.Knapsack(np.ones(10), 3.0)}, "cardinality budget only"),
    ({"n_parts": 2, "constraint": submod.PartitionMatroid(np.zeros(10, dtype=int), [2])}, "cardinality budget"),
    ({"n_parts": 2, "certificate_prefixes": -1}, "certificate_prefixes"),
    ({"n_parts": 2, "executor": object()}, "concurrent.futures.Executor"),
    ({"n_parts": 2, "eps": 0.0}, "eps"),
    ({"n_parts": 2, "gamma_lower": 1.5}, "gamma_lower"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    f = submod.Modular(np.arange(10.0))
    with pytest.raises(ValueError, match=match):
        submod.maximize_distributed(f, 3, **kwargs)


class _WrongSizeRestrict(submod.Modular):
    """restrict returns the first weights instead of the part's: a function on the wrong number of elements."""

    def restrict(self, indices, *, local=False):
        return submod.Modular(self.weights[:3]) if len(indices) > 3 else submod.Modular.restrict(self, indices)


class _ArrayRestrict(submod.Modular):
    def restrict(self, indices, *, local=False):
        return self.weights[np.asarray(indices)]


def test_a_restriction_on_the_wrong_number_of_elements_is_refused():
    # A restriction on 3 elements for a part of 10 made greedy choose among that part's first 3 elements: a
    # wrong set, silently (value 9 for k = 2 on weights 0..19, where greedy finds 19 + 18).
    with pytest.raises(ValueError, match=r"_WrongSizeRestrict.restrict\(indices\) must return a SetFunction on "
                                         r"len\(indices\) = 10 elements.*got a SetFunction on 3 elements"):
        submod.maximize_distributed(_WrongSizeRestrict(np.arange(20.0)), 2, partition=np.arange(20) % 2)
    with pytest.raises(ValueError, match="must return a SetFunction .* got ndarray"):
        submod.maximize_distributed(_ArrayRestrict(np.arange(20.0)), 2, n_parts=2, seed=0)


def test_bad_objective_budget_and_missing_restrict():
    with pytest.raises(ValueError, match="SetFunction"):
        submod.maximize_distributed(np.ones(3), 1, n_parts=1)
    with pytest.raises(ValueError, match="exceeds"):
        submod.maximize_distributed(submod.Modular(np.ones(3)), 4, n_parts=2)
    with pytest.raises(NotImplementedError, match=r"implement restrict\(self, indices"):
        submod.maximize_distributed(_NoRestrict(6), 2, n_parts=2, seed=0)
    f = submod.Modular(np.ones(4))
    with pytest.raises(ValueError, match="at least one index"):
        f.restrict([])
    with pytest.raises(ValueError, match="repeated"):
        f.restrict([1, 1])
    with pytest.raises(ValueError, match="outside"):
        f.restrict([4])


def _gains_in_child(n):
    f = submod.FacilityLocation(np.random.default_rng(0).standard_normal((n, 3)))
    return float(f.init_state().gains().sum())   # >= 128 candidates: the gains use the shared thread pool


def test_a_process_forked_after_the_thread_pool_was_used_still_computes_gains():
    """The module's thread pool does not survive fork; a forked worker starts its own (it used to hang)."""
    import multiprocessing

    f = submod.FacilityLocation(np.random.default_rng(1).standard_normal((3000, 4)))
    submod.maximize(f, 20, method="lazy")                      # uses the parent's thread pool (with 2 cores)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        assert pool.submit(_gains_in_child, 300).result(timeout=60) == pytest.approx(_gains_in_child(300))
