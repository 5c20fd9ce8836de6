"""Does the run-level test hold its level? Simulated A/A comparisons with case and run effects.

Two arms trained with the same method (no difference) are simulated the way ``compare`` sees them: per
case, a value made of a case effect (shared by every run: some cases are hard), a model effect per run
and fold (each fold's model is its own training: all cases of a fold move together) and a case-by-run
noise. The run-level t-test of :mod:`.replicates` should reject in about 5 % of simulations at
alpha = 0.05; the case-level Wilcoxon test on the same data, which ignores the model effects, rejects far
more often. The same simulation gives the coverage of the run-aware interval and the power at the
smallest detectable difference (which should be about 80 %).

Default variance components are of the order estimated from the two baseline runs in
``docs/results/cv_dsb2018.json`` (25 cases in 5 folds): case SD 0.07, model SD 0.015 per fold,
case-by-run SD 0.025 (foreground Dice).

Run ``python -m nnunet_selfreg.evaluation.calibration --help``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

from nnunet_selfreg.evaluation.replicates import ALPHA, detectable_difference, hierarchical_interval, run_t_test


@dataclass(frozen=True)
class Design:
    runs: int = 2  # per arm
    folds: int = 5
    cases_per_fold: int = 5
    sd_case: float = 0.07  # shared by every run of both arms
    sd_model: float = 0.015  # one value per run and fold (each fold's model is one training)
    sd_noise: float = 0.025  # case-by-run
    difference: float = 0.0  # true difference of the second arm

    @property
    def fold_of_case(self) -> np.ndarray:
        return np.repeat(np.arange(self.folds), self.cases_per_fold)

    @property
    def run_mean_sd(self) -> float:
        """SD of one run's mean over the cases (the case effect is common to all runs and drops out)."""
        return math.sqrt(self.sd_model**2 / self.folds + self.sd_noise**2 / (self.folds * self.cases_per_fold))


def simulate(design: Design, n_simulations: int, rng: np.random.Generator) -> np.ndarray:
    """(simulations, 2 arms, runs, cases) per-case values."""
    n_cases = design.folds * design.cases_per_fold
    shape = (n_simulations, 2, design.runs)
    case = rng.normal(0.0, design.sd_case, (n_simulations, 1, 1, n_cases))
    model = rng.normal(0.0, design.sd_model, (*shape, design.folds))[..., design.fold_of_case]
    noise = rng.normal(0.0, design.sd_noise, (*shape, n_cases))
    values = 0.8 + case + model + noise
    values[:, 1] += design.difference
    return values


@dataclass
class Calibration:
    design: Design
    n_simulations: int
    run_level_rate: float  # share of A/A simulations where the run-level t-test rejects at ALPHA
    wilcoxon_rate: float  # the case-level Wilcoxon test of the arms' per-case means, same data
    wilcoxon_one_run_rate: float  # the case-level Wilcoxon test of one run per arm (a single-run compare)
    n_interval_simulations: int
    interval_coverage: float  # share of run-aware intervals that hold the true difference 0
    detectable_difference: float  # from the true run-mean SD
    power_at_detectable: float  # share of simulations with that true difference where the test rejects
    seconds: float

    def binomial_se(self, rate: float, n: int | None = None) -> float:
        n = n or self.n_simulations
        return math.sqrt(rate * (1 - rate) / n)


def rejection_rates(values: np.ndarray) -> tuple[float, float, float]:
    """Rates at ALPHA of the run-level t-test, the case-level Wilcoxon test of the arm means and of one run."""
    run_means = values.mean(axis=-1)  # (simulations, arm, run)
    _, _, p_run = run_t_test(run_means[:, 0], run_means[:, 1])
    arm_means = values.mean(axis=2)  # (simulations, arm, case)
    p_cases = stats.wilcoxon(arm_means[:, 1] - arm_means[:, 0], axis=-1).pvalue
    p_one = stats.wilcoxon(values[:, 1, 0] - values[:, 0, 0], axis=-1).pvalue
    return tuple(float(np.mean(p < ALPHA)) for p in (p_run, p_cases, p_one))  # type: ignore[return-value]


def calibrate(
    design: Design, n_simulations: int = 2000, n_interval: int = 200, n_boot: int = 999, seed: int = 0
) -> Calibration:
    start = time.process_time()
    rng = np.random.default_rng(seed)
    values = simulate(design, n_simulations, rng)
    run_rate, wilcoxon_rate, one_run_rate = rejection_rates(values)
    folds = design.fold_of_case
    covered = [
        low <= design.difference <= high
        for s in range(min(n_interval, n_simulations))
        for low, high in [hierarchical_interval(values[s, 0], values[s, 1], folds, n_boot, seed + s)]
    ]
    detectable = detectable_difference(design.run_mean_sd, design.runs, design.runs)
    shifted = simulate(replace(design, difference=detectable), n_simulations, rng)
    power = rejection_rates(shifted)[0]
    coverage = float(np.mean(covered)) if covered else math.nan
    return Calibration(
        design, n_simulations, run_rate, wilcoxon_rate, one_run_rate, len(covered), coverage, detectable, power,
        time.process_time() - start,
    )  # fmt: skip


def table(results: list[Calibration]) -> str:
    """A markdown table of calibrations (rates with their binomial standard errors)."""

    def rate(value: float, n: int) -> str:
        return f"{100 * value:.1f} % ± {100 * math.sqrt(value * (1 - value) / n):.1f}"

    header = (
        "| runs per arm | cases (folds) | run-level t-test | case-level Wilcoxon (arm means) | case-level Wilcoxon "
        "(one run each) | run-aware interval covers 0 | detectable difference | power there |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {c.design.runs} | {c.design.folds * c.design.cases_per_fold} ({c.design.folds}) | "
        f"{rate(c.run_level_rate, c.n_simulations)} | {rate(c.wilcoxon_rate, c.n_simulations)} | "
        f"{rate(c.wilcoxon_one_run_rate, c.n_simulations)} | "
        f"{rate(c.interval_coverage, c.n_interval_simulations)} | {c.detectable_difference:.4f} | "
        f"{rate(c.power_at_detectable, c.n_simulations)} |"
        for c in results
    ]
    return header + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_selfreg.evaluation.calibration",
        description="Rejection rates at alpha = 0.05 on simulated A/A data with case and run effects.",
    )
    defaults = Design()
    parser.add_argument("--runs", type=int, nargs="+", default=[2, 3, 5], help="runs per arm (default: 2 3 5)")
    parser.add_argument("--folds", type=int, default=defaults.folds)
    parser.add_argument("--cases-per-fold", type=int, default=defaults.cases_per_fold)
    parser.add_argument("--sd-case", type=float, default=defaults.sd_case)
    parser.add_argument("--sd-model", type=float, default=defaults.sd_model)
    parser.add_argument("--sd-noise", type=float, default=defaults.sd_noise)
    parser.add_argument("--simulations", type=int, default=4000, help="A/A simulations per design (default: 4000)")
    parser.add_argument("--interval-simulations", type=int, default=1000, help="of them, with an interval")
    parser.add_argument("--n-boot", type=int, default=999, help="resamples per interval (default: 999)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = [
        calibrate(
            Design(k, args.folds, args.cases_per_fold, args.sd_case, args.sd_model, args.sd_noise),
            args.simulations,
            args.interval_simulations,
            args.n_boot,
            args.seed,
        )
        for k in args.runs
    ]
    print(table(results))
    print(f"\nCPU time: {sum(c.seconds for c in results):.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
