"""A Markdown report (with PNG figures) of every check :mod:`verification` can run on one objective.

Each statement is labelled: **guaranteed** (exact, or a proven bound) or **estimate** (an empirical number that
proves nothing). Files are written to temporary names and moved into place with ``os.replace`` only once all of
them are complete, so an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submod
from submod import SetFunction
from submod._atomic import file_mode
from submod._validation import check_k, rng_from_seed

from ._serialise import ResultDict
from ._values import MAX_TABLE_N
from .certify import certify, prefix_bounds
from .decay import ErrorDecay, error_decay
from .guarantee import MAX_BRUTE_FORCE_N, GuaranteeCheck, check_guarantee
from .ratio import RatioEstimate, _exact_pairs, is_regression, submodularity_ratio

__all__ = ["report", "Report"]


@dataclass
class Report(ResultDict):
    """What :func:`report` computed, and where it wrote it.

    Attributes
    ----------
    path : pathlib.Path
        The Markdown file.
    figures : list of pathlib.Path
        The PNG files.
    ratios : list of RatioEstimate
    guarantee : GuaranteeCheck or None
        Brute-force comparison (small ground sets only).
    certificate : CertificateCheck or None
        The sound certificate (``None`` when no proven ``gamma > 0`` is available, or ``f`` is declared
        ``monotone=False``).
    gamma_one_bound : float or None
        The submodular online bound (``gamma = 1``) of the greedy run, for functions not declared submodular:
        NOT a valid bound there.
    gamma_one_invalid : bool or None
        ``True`` when that number falls below the brute-force optimum (shown invalid on this instance).
    lazy_violations : list
        Stale-bound violations seen by plain lazy greedy.
    lazy_value : float or None
        ``F`` of the set plain lazy greedy (``lazy_fallback=False``) returned, to compare with ``greedy_value``.
    greedy_value : float or None
        ``F`` of the set exact greedy returned (the run that the ratios, certificate and online bound are about).
    decay : ErrorDecay or None
    markdown : str
        The text of the Markdown file at ``path``.

    ``to_dict()`` returns these attributes as JSON-serialisable builtins: paths as strings, the nested results as
    their own ``to_dict()``, a non-finite float as the string ``"nan"``, ``"inf"`` or ``"-inf"``.
    """

    path: Path
    figures: list[Path] = field(default_factory=list)
    ratios: list[RatioEstimate] = field(default_factory=list)
    guarantee: GuaranteeCheck | None = None
    certificate: Any = None
    gamma_one_bound: float | None = None
    gamma_one_invalid: bool | None = None
    lazy_violations: list = field(default_factory=list)
    lazy_value: float | None = None
    greedy_value: float | None = None
    decay: ErrorDecay | None = None
    markdown: str = ""


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.6g}"


def report(f: SetFunction, k: int, out_dir: str | os.PathLike, *, title: str = "Verification report",
           seed: int = 0, n_samples: int = 500, k_max: int | None = None, n_seeds: int = 10,
           figures: bool = True, prefix: str = "verify") -> Report:
    """Run the checks that fit the size of ``f`` and write ``<out_dir>/<prefix>_report.md`` plus PNG figures.

    Runs: the submodularity ratio ``gamma_{S_greedy, k}`` by every applicable method (exact when small, spectral
    for least squares, sampled, greedy path); the brute-force guarantee check (``n <= 14``); the sound
    certificate and, for functions not declared submodular, the ``gamma = 1`` online bound next to the optimum;
    plain lazy greedy's stale-bound violations; and, for :class:`submod.SparseRegression`, the error decay with
    its figure.

    Parameters
    ----------
    f : submod.SetFunction
    k : int
        Budget.
    out_dir : path
        Directory (created if needed).
    title : str
    seed : int
        Seed of the sampled ratio.
    n_samples : int
        Pairs for the sampled ratio.
    k_max : int, optional
        Longest prefix for the error decay (default ``min(n, max(2k, 10))``).
    n_seeds : int
        Seeds of stochastic greedy in the guarantee check.
    figures : bool, default True
        Write PNG figures (matplotlib, Agg backend).
    prefix : str, default "verify"
        File-name prefix.

    Returns
    -------
    Report

    Examples
    --------
    >>> import tempfile
    >>> import submod, verification as vf
    >>> from verification.strategies import suppressor_data
    >>> d = suppressor_data()
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     rep = vf.report(submod.SparseRegression(d.A, d.Y), 2, tmp, figures=False)
    ...     text = rep.path.read_text()
    >>> rep.gamma_one_invalid, "INVALID" in text
    (True, True)
    """
    if not isinstance(f, SetFunction):
        raise ValueError(f"f must be a submod.SetFunction; got {type(f).__name__}.")
    if isinstance(k, numbers.Integral) and not isinstance(k, bool) and k < 1:  # 0 and -1 alike (-1 read 'non-negative')
        raise ValueError(f"k must be a positive integer (the budget); got {k}.")
    kk = check_k(k, f.n)
    rng_from_seed(seed)  # before the directory is created, as the checks below
    # checked before the directory is created, so that a bad call leaves nothing behind
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, numbers.Integral)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}.")
    if k_max is not None and (isinstance(k_max, bool) or not isinstance(k_max, numbers.Integral)
                              or not 1 <= k_max <= f.n):
        raise ValueError(f"k_max must be an integer in [1, {f.n}] (the number of units); got {k_max!r}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory; pass a directory path.")
    out.mkdir(parents=True, exist_ok=True)
    regression = is_regression(f)
    rep = Report(path=out / f"{prefix}_report.md")

    greedy = submod.maximize(f, kk, method="greedy")
    rep.greedy_value = greedy.value
    U = greedy.selected
    ratios = rep.ratios
    if f.n <= MAX_TABLE_N and _exact_pairs(f.n, U.size, kk) <= 2_000_000:
        ratios.append(submodularity_ratio(f, kk, U, method="exact"))
    if regression:
        ratios.append(submodularity_ratio(f, kk, U, method="spectral"))
    ratios.append(submodularity_ratio(f, kk, U, method="sampled", n_samples=n_samples, seed=seed))
    if f.n <= MAX_BRUTE_FORCE_N:
        rep.guarantee = check_guarantee(f, kk, n_seeds=n_seeds)
    # Toward an optimal set (size k) the path ratios bound gamma_{S_greedy, k} itself; toward V a larger k'.
    comparator = None if rep.guarantee is None else list(rep.guarantee.opt_set)
    ratios.append(submodularity_ratio(f, kk, method="greedy-path", result=greedy, comparator=comparator))

    sound = [r for r in ratios if r.sound_lower and r.U is not None and set(U.tolist()) <= set(r.U) and r.k >= kk]
    best_sound = max(sound, key=lambda r: (r.kind == "exact", r.value), default=None)
    if not f.monotone:
        pass  # certify's bounds hold for monotone functions only; the report says so
    elif f.submodular:
        rep.certificate = certify(f, greedy)
    elif best_sound is not None and best_sound.value > 0:
        rep.certificate = certify(f, greedy, best_sound)
    if not f.submodular:
        b1, _ = prefix_bounds(f, U, kk, 1.0)
        rep.gamma_one_bound = float(b1.min())
        if rep.guarantee is not None:
            rep.gamma_one_invalid = bool(rep.gamma_one_bound < rep.guarantee.opt * (1 - 1e-9))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lazy = submod.maximize(f, kk, method="lazy", lazy_fallback=False)
    rep.lazy_violations = list(lazy.violations)
    rep.lazy_value = lazy.value

    fig_paths: list[tuple[Path, Any]] = []
    if regression:
        km = min(f.n, max(2 * kk, 10)) if k_max is None else k_max
        rep.decay = error_decay(f, km)
        if figures:
            fig_paths.append((out / f"{prefix}_decay.png", rep.decay.plot()))
    if figures:
        fig_paths.append((out / f"{prefix}_ratios.png", _ratio_figure(rep)))
    rep.markdown = _markdown(rep, f, kk, title, [p.name for p, _ in fig_paths])
    _write_atomically(rep.path, rep.markdown, fig_paths)
    rep.figures = [p for p, _ in fig_paths]
    return rep


def _write_atomically(md_path: Path, text: str, figs: list[tuple[Path, Any]]) -> None:
    import matplotlib.pyplot as plt

    tmp_files: list[tuple[str, Path]] = []
    try:
        for path, fig in figs:
            fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=path.parent)
            os.close(fd)
            tmp_files.append((tmp, path))
            fig.savefig(tmp, format="png")
            plt.close(fig)
        fd, tmp = tempfile.mkstemp(suffix=".md.tmp", dir=md_path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        tmp_files.append((tmp, md_path))
    except BaseException:
        for tmp, _ in tmp_files:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    mode = file_mode()
    for tmp, final in tmp_files:
        os.chmod(tmp, mode)  # mkstemp creates 0600; give the report the permissions a plain open() would
        os.replace(tmp, final)



def _ratio_figure(rep: Report) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    colours = {"exact": "tab:green", "lower bound": "tab:blue", "upper bound": "tab:red", "estimate": "0.5"}
    k = min(r.k for r in rep.ratios)
    shown = [r for r in rep.ratios if r.k == k]  # the same quantity gamma_{S_greedy, k} only
    names = [f"{r.method}\n({r.kind})" for r in shown]
    vals = [r.value for r in shown]
    ax.bar(range(len(vals)), vals, color=[colours[r.kind] for r in shown])
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(vals)), names, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"gamma(S_greedy, k={k})")
    ax.set_title("submodularity ratio: lower bounds <= exact <= upper bounds")
    for i, v in enumerate(vals):
        ax.text(i, min(v, 1.0) + 0.02, f"{v:.3f}", ha="center", fontsize=8)
    fig.tight_layout()
    return fig


def _markdown(rep: Report, f: SetFunction, k: int, title: str, fig_names: list[str]) -> str:
    L: list[str] = [f"# {title}", ""]
    L.append(f"Objective: `{f!r}`, ground set n = {f.n}, budget k = {k}, declared submodular: {f.submodular}.")
    L.append("")
    L.append("Every number is labelled **exact**, **proven lower bound**, **proven upper bound** (guaranteed "
             "statements) or **estimate** (empirical; proves nothing).")
    L += ["", "## Submodularity ratio of the greedy set", "",
          "U = the greedy set S_G; gamma_{U,k} is the ratio Das & Kempe's guarantee uses.", "",
          "| method | quantity | value | kind | usable in a guarantee | details | cost |",
          "|---|---|---|---|---|---|---|"]
    for r in rep.ratios:
        parts = [r.parameters.get("bound") or r.parameters.get("note", "")]
        if r.parameters.get("witness_S") is not None:
            parts.append(f"minimising pair L = {r.parameters['witness_L']}, S = {r.parameters['witness_S']}")
        if r.method == "greedy-path":
            parts.append("comparator T = " + ("V" if r.parameters.get("comparator") is None else
                                              f"an optimal set {r.parameters['comparator']}"))
        cost = ", ".join(f"{key} {_fmt(v)}" for key, v in r.cost.items())
        L.append(f"| {r.method} | gamma_{{U,{r.k}}} | {r.value:.6g} | {r.kind} | "
                 f"{'yes' if r.sound_lower else 'no'} | {'; '.join(p for p in parts if p)} | {cost} |")
    exact = [r for r in rep.ratios if r.kind == "exact"]
    if exact and exact[0].value < 1 - 1e-9:
        L += ["", f"**Exact: gamma = {exact[0].value:.4g} < 1**, so F is not submodular on this instance: the "
                  "submodular (gamma = 1) guarantees and certificates do not apply."]
    path_est = next((r for r in rep.ratios if r.method == "greedy-path"), None)
    if path_est is not None and path_est.details.get("dr_ratio_upper") is not None:
        L += ["", f"Stale-bound violations give a **proven upper bound** {path_est.details['dr_ratio_upper']:.4g} "
                  "on the diminishing-returns ratio."]

    g = rep.guarantee
    if g is not None:
        L += ["", "## Guarantees against the brute-force optimum", "",
              f"OPT_{k} = {g.opt:.6g} (**exact**, brute force; an optimal set: {list(g.opt_set)}). "
              f"Exact gamma_{{S_G,k}} = {g.gamma:.4g}; exact ratio over reachable sets = {g.gamma_reachable:.4g}; "
              f"exact generalised curvature along the greedy prefixes alpha = {g.alpha:.4g}.", "",
              "| method | value | value / OPT | bound (factor) | holds | Bian et al. bound | holds | theorem? | "
              "note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in g.rows:
            bian = "n/a" if r.bian_bound_value is None else f"{r.bian_bound_value:.6g} ({r.bian_factor:.4g})"
            spread = f" +- {r.value_std:.3g}" if r.value_std > 1e-9 * max(abs(r.value), 1.0) else ""
            L.append(f"| {r.method} | {r.value:.6g}{spread} | "
                     f"{r.value / g.opt if g.opt > 0 else 1.0:.4g} | {r.bound:.6g} ({r.factor:.4g}) | {r.holds} | "
                     f"{bian} | {r.holds_bian if r.holds_bian is not None else 'n/a'} | "
                     f"{'yes' if r.theorem else 'no'} | {r.note} |")

    L += ["", "## Certificates (upper bounds on OPT)", ""]
    c = rep.certificate
    if c is not None:
        L.append(f"**Proven upper bound**: OPT_{k} <= {c.upper_bound:.6g}, so greedy's value {c.value:.6g} satisfies "
                 f"value / OPT_{k} >= {c.ratio:.4g} (gamma >= {c.gamma_lower:.4g}: {c.gamma_source}).")
    elif not f.monotone:
        L.append("No certificate: F is declared monotone=False, and the bounds on OPT (the online bound and F(V)) "
                 "hold for monotone functions only.")
    else:
        L.append("No sound certificate: no proven lower bound gamma > 0 is available for this instance (dead or "
                 "duplicate units, or no spectral bound for this objective).")
    if rep.gamma_one_bound is not None:
        line = (f"The submodular online bound (gamma = 1, Leskovec et al. 2007) would claim OPT_{k} <= "
                f"{rep.gamma_one_bound:.6g}. It is **not a valid bound** for a function that is not submodular")
        if rep.gamma_one_invalid:
            line += (f": here it is **INVALID**, it falls below the exact optimum {g.opt:.6g}."
                     if g is not None else ".")
        elif g is not None:
            line += f" (on this instance it happens to stay above OPT = {g.opt:.6g}, which proves nothing)."
        else:
            line += "."
        L.append("")
        L.append(line)

    L += ["", "## Lazy greedy", ""]
    if rep.lazy_violations:
        L.append(f"Plain lazy greedy (`lazy_fallback=False`) met **{len(rep.lazy_violations)} stale-bound "
                 "violation(s)** (exact observations): a fresh gain larger than its stale value, so stale gains are "
                 "not upper bounds here.")
        L += ["", "| step | element | stale bound | fresh gain |", "|---|---|---|---|"]
        for step, el, stale, fresh in rep.lazy_violations[:20]:
            L.append(f"| {step} | {el} | {stale:.6g} | {fresh:.6g} |")
        L.append("")
        L.append(f"Plain lazy value {rep.lazy_value:.6g} vs exact greedy {rep.greedy_value:.6g}. Use "
                 "`lazy_fallback=True` (the default) or `method='greedy'`.")
    else:
        L.append("Plain lazy greedy (`lazy_fallback=False`) met no stale-bound violation on this run (an "
                 "observation, not a proof of submodularity: it only re-evaluates the top of its queue).")
        if rep.lazy_value is not None and rep.greedy_value is not None and \
                rep.lazy_value < rep.greedy_value * (1 - 1e-9):
            L.append("")
            L.append(f"Yet its value {rep.lazy_value:.6g} is **below** exact greedy's {rep.greedy_value:.6g} "
                     "(exact): plain lazy lost silently. Use `lazy_fallback=True` (the default) or "
                     "`method='greedy'`.")

    d = rep.decay
    if d is not None:
        L += ["", "## Error decay along the greedy path", ""]
        L += [f"![error decay]({n})" for n in fig_names if n.endswith("_decay.png")] + [""]
        L.append(f"Measured relative residual (**exact**) at k = 0..{d.kept[-1]}: "
                 + ", ".join(f"{v:.3g}" for v in d.relative_errors[: min(12, d.kept.size)])
                 + (" ..." if d.kept.size > 12 else ""))
        L += ["", f"lambda_min of the whitened Gram = {d.lambda_min:.4g} (**proven lower bound** on every ratio "
                  "toward V).", "", "| bound (proven upper bound) | holds | vacuous | at k = k_max | definition |",
              "|---|---|---|---|---|"]
        for b in d.bounds:
            L.append(f"| {b.name} | {b.holds} | {b.vacuous} | {b.values[-1] / d.y_norm2 if d.y_norm2 else 0:.3g} "
                     f"| {b.description} |")
        L += ["", f"Fitted contraction factor rho = {_fmt(d.contraction)} per kept unit over "
                  f"{d.contraction_points} points (**estimate**: a least-squares fit, not a guarantee)."]
        if d.preconditions:
            L += ["", "Preconditions (degenerate units and data, each with its consequence for the bounds):"]
            L += [f"- {p}" for p in d.preconditions]
        else:
            L += ["", "Preconditions checked: no dead or duplicate units, enough samples for the columns."]
    for n in fig_names:
        if n.endswith("_ratios.png"):
            L += ["", "## Figure: ratio estimates", "", f"![ratios]({n})"]
    L += ["", "## What is guaranteed and what is estimated", "",
          "- Guaranteed: exact values (brute force, exact ratio enumeration, measured residuals), the spectral "
          "lower bound on gamma, the certificate, every error bound marked 'proven upper bound', stale-bound "
          "violations (observed facts).",
          "- Not guarantees: the sampled and greedy-path ratios (upper bounds: they can only refute), the fitted "
          "contraction factor, the stochastic-greedy mean (an estimate of an expectation), and the gamma = 1 "
          "online bound on a function that is not submodular.", ""]
    return "\n".join(L)
