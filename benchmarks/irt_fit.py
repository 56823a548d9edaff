"""IRT fitting speed: evoforge's alternating Newton vs a joint L-BFGS MAP fit, in one process.

Both fit the same simulated 500 × 5,000 response matrix (the size the issue names) to the same
posterior; the script prints each one's time, the ratio, and how well each recovers the known
abilities and difficulties. Run: ``python benchmarks/irt_fit.py [--models M --items N --dims D]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from fitness.irt import DIFFICULTY_PRIOR_SD, fit_irt, simulate_responses


def lbfgs_fit(responses: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook approach: every parameter at once, full-batch L-BFGS on the log-posterior."""
    n_models, n_items = responses.shape
    theta = torch.zeros(n_models, dims, dtype=torch.float64, requires_grad=True)
    alpha = torch.ones(n_items, dims, dtype=torch.float64, requires_grad=True)
    beta = torch.zeros(n_items, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta, alpha, beta], max_iter=500,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = theta @ alpha.T - beta
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, responses,
                                                                    reduction="sum")
        loss = loss + 0.5 * (theta.pow(2).sum() + (alpha - 1).pow(2).sum()
                             + (beta / DIFFICULTY_PRIOR_SD).pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return theta.detach(), beta.detach()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--dims", type=int, default=1)
    args = parser.parse_args()
    responses, theta, _, beta = simulate_responses(args.models, args.items, args.dims, seed=0)
    started = time.perf_counter()
    ours = fit_irt(responses, args.dims)
    ours_time = time.perf_counter() - started
    started = time.perf_counter()
    peer_theta, peer_beta = lbfgs_fit(responses, args.dims)
    peer_time = time.perf_counter() - started
    print(f"{args.models} models x {args.items} items, {args.dims}-D, "
          f"{torch.get_num_threads()} threads")
    print(f"evoforge alternating Newton: {ours_time:6.2f} s  ability r = "
          f"{_corr(ours.abilities[:, 0], theta[:, 0]):.4f}  difficulty r = "
          f"{_corr(ours.difficulty, beta):.4f}")
    print(f"joint L-BFGS (peer):         {peer_time:6.2f} s  ability r = "
          f"{_corr(peer_theta[:, 0], theta[:, 0]):.4f}  difficulty r = "
          f"{_corr(peer_beta, beta):.4f}")
    print(f"speed-up: {peer_time / ours_time:.1f}x")


if __name__ == "__main__":
    main()
