"""IRT fitting: evoforge's alternating Newton against girth, a maintained IRT library, in one process.

Both fit the same simulated 500 × 5,000 response matrix (models × items, known abilities and
item parameters) with a 2PL model. The peer is girth's joint maximum likelihood (`twopl_jml`, then
`ability_map` for the abilities: the same joint estimation family as ours, which is a joint MAP
with N(0, 1) abilities, N(1, 1) discriminations and a wide prior on difficulties; girth's JML has
no priors). With `--mml`, girth's marginal maximum likelihood (a N(0, 1) ability prior, like ours)
runs too, on `--mml-items` items: it takes minutes per 500 items. Each is run once after a warm-up
on a small matrix; the script prints times, the ratio, and how well each recovers the known
intercepts (discrimination × difficulty, as our logits use them) and abilities.

    python benchmarks/irt_fit.py [--models 500] [--items 5000] [--mml --mml-items 250]
"""

from __future__ import annotations

import argparse
import time
import warnings

import girth
import numpy as np
import torch

from fitness.irt import fit_irt, simulate_responses


def _corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=float), np.asarray(b, dtype=float))[0, 1])


def _ours(responses: torch.Tensor) -> tuple[float, np.ndarray, np.ndarray]:
    started = time.perf_counter()
    fit = fit_irt(responses, 1)
    return time.perf_counter() - started, fit.difficulty.numpy(), fit.abilities[:, 0].numpy()


def _girth(responses: torch.Tensor, method) -> tuple[float, np.ndarray, np.ndarray]:
    data = responses.numpy().T.astype(int)  # girth: items x participants
    started = time.perf_counter()
    items = method(data)
    abilities = girth.ability_map(data, items["Difficulty"], items["Discrimination"])
    seconds = time.perf_counter() - started
    return seconds, items["Discrimination"] * items["Difficulty"], abilities


def _report(label: str, result, beta: torch.Tensor, theta: torch.Tensor) -> float:
    seconds, intercepts, abilities = result
    print(f"{label:34s} {seconds:8.2f} s   intercept r = {_corr(intercepts, beta):.4f}   "
          f"ability r = {_corr(abilities, theta[:, 0]):.4f}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--mml", action="store_true", help="also girth's MML (slow)")
    parser.add_argument("--mml-items", type=int, default=250)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # girth's log(0) on the way
    warm = simulate_responses(50, 40, 1, seed=1)[0]
    _ours(warm), _girth(warm, girth.twopl_jml)
    responses, theta, _, beta = simulate_responses(args.models, args.items, 1, seed=0)
    print(f"{args.models} models x {args.items} items, 1-D 2PL, {torch.get_num_threads()} threads")
    ours = _report("evoforge (alternating Newton, MAP)", _ours(responses), beta, theta)
    jml = _report("girth twopl_jml + ability_map", _girth(responses, girth.twopl_jml), beta,
                  theta)
    print(f"ratio girth JML / evoforge: {jml / ours:.1f}x")
    if args.mml:
        small = responses[:, :args.mml_items]
        print(f"on the first {args.mml_items} items:")
        ours_small = _report("evoforge", _ours(small), beta[:args.mml_items], theta)
        mml = _report("girth twopl_mml + ability_map", _girth(small, girth.twopl_mml),
                      beta[:args.mml_items], theta)
        print(f"ratio girth MML / evoforge: {mml / ours_small:.0f}x")


if __name__ == "__main__":
    main()
