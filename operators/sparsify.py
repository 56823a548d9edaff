"""Which entries of a task vector survive, and how survivors are rescaled.

A sparsifier looks at one model's task vector for one tensor (delta = model - base) and returns a
`Keep`; the merge engine then streams the tensor chunk by chunk and applies the `Keep` to each
chunk of delta in place. Planning streams too: nothing here holds a full-size copy of delta except
DELLA's rank computation and, for DARE off the C kernels (GPU, other dtypes), the keep mask
itself; the kernels draw DARE's keeps where they apply them.

- ``magnitude`` (TIES): keep the k = max(1, int(density * n)) largest |delta| of the tensor.
- ``magnitude_outliers`` (Model Breadcrumbs): drop the int(gamma * n) largest as outliers and the
  smallest, keeping a band of int(density * n).
  Both keep exactly that many: entries tied at a boundary are taken in flat index order
  (`operators.ties`); ``tie_break: mergekit`` takes them as mergekit's unstable argsort does.
- ``random`` (DARE): keep each entry with probability `density`, from the counter-based stream of
  (seed, tensor, model), so masks are the same on any device.
- ``della_magprune`` (DELLA): keep probability rises linearly with the magnitude rank inside each
  row, from density - epsilon to density + epsilon.

Rescaling of random survivors (a documented convention switch, ``rescale_mode``):
``l1`` multiplies them so the L1 norm matches the unpruned delta (mergekit 0.1.5; the norms are
summed in float64), ``inverse_p`` divides each survivor by its keep probability (the DARE and DELLA
papers). Magnitude trims take ``rescale: true`` as l1 too, as in mergekit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from operators import native, rng
from operators.chunks import CHUNK_ELEMENTS, Workspace, flat, spans
from operators.quantiles import kth_smallest_sampled
from operators.ties import TieCount, TieWindow, count_chunks

_L1_EPS = 1e-7  # below this L1 norm mergekit skips rescaling; so do we
_SAMPLE = 1 << 14  # values sampled to bracket a trim threshold


class Sparsifier(StrEnum):
    MAGNITUDE = "magnitude"
    MAGNITUDE_OUTLIERS = "magnitude_outliers"
    RANDOM = "random"
    DELLA = "della_magprune"


class RescaleMode(StrEnum):
    L1 = "l1"
    INVERSE_P = "inverse_p"


class TieBreak(StrEnum):
    INDEX = "index"  # ties at a trim's boundary in flat index order (`operators.ties`)
    MERGEKIT = "mergekit"  # torch's unstable argsort, as mergekit 0.1.5 calls it


@dataclass
class Keep:
    """Survivors of one task vector: delta_kept = delta * [low <= |delta| <= high] * mask * scale.

    `band` is decided per chunk from |delta| (magnitude trims), `windows` say which entries equal
    to its low and high edge are kept (None: all of them); `mask` is a flat float tensor of 0/1
    keeps or per-entry scales (random trims); `draw` = (stream key, keep probability) is a DARE
    draw made where it is applied, never stored.
    """

    band: tuple[float, float] | None = None
    windows: tuple[TieWindow | None, TieWindow | None] = (None, None)
    mask: torch.Tensor | None = None
    draw: tuple[int, float] | None = None
    scale: float = 1.0

    def apply_(self, delta: torch.Tensor, start: int, stop: int, scratch: torch.Tensor,
               flags: torch.Tensor) -> None:
        """Trim one chunk of delta in place (`scratch`, `flags`: float buffers of its size)."""
        if self.band is not None and self.windows != (None, None):
            delta.mul_(self._band_with_windows(torch.abs(delta, out=scratch), start))
        elif self.band is not None:
            low, high = self.band
            if high < math.inf:
                torch.abs(delta, out=scratch)
                delta.mul_(torch.le(scratch, high, out=flags))
            # |delta| >= low, as hardshrink's |delta| > (the float32 just below low): one pass.
            torch.hardshrink(delta, _below(low), out=delta)
        if self.mask is not None:
            delta.mul_(self.mask[start:stop])
        if self.draw is not None:
            key, probability = self.draw
            delta.mul_(rng.keep_mask(key, start, stop - start, probability, delta.device))
        if self.scale != 1.0:
            delta.mul_(self.scale)

    def _band_with_windows(self, magnitude: torch.Tensor, start: int) -> torch.Tensor:
        """0/1 keeps of a chunk: strictly inside the band, or at an edge within its window."""
        (low, high), (low_window, high_window) = self.band, self.windows
        keep = ((magnitude > low) & (magnitude < high)).to(magnitude.dtype)
        at_low = (magnitude == low).to(magnitude.dtype)
        keep += low_window.kept(at_low, start) if low_window else at_low
        if high != low:
            at_high = (magnitude == high).to(magnitude.dtype)
            keep += high_window.kept(at_high, start) if high_window else at_high
        return keep


def _below(value: float) -> float:
    """The largest float32 strictly below `value` (for value > 0; 0 stays 0)."""
    if value <= 0:
        return 0.0
    return torch.nextafter(torch.tensor(value, dtype=torch.float32), torch.tensor(0.0)).item()


def _delta_chunks(model: torch.Tensor, base: torch.Tensor, ws: Workspace
                  ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, delta chunk in a reused float32 buffer) over a flat tensor pair."""
    buffer = ws.get("delta-chunk", min(model.numel(), CHUNK_ELEMENTS))
    for start, stop in spans(model.numel()):
        out = buffer[: stop - start]
        torch.sub(model[start:stop].float(), base[start:stop].float(), out=out)
        yield start, stop, out


def _magnitude_stream(model: torch.Tensor, base: torch.Tensor, ws: Workspace
                      ) -> Callable[[], Iterator[torch.Tensor]]:
    def chunks() -> Iterator[torch.Tensor]:
        for _, _, delta in _delta_chunks(model, base, ws):
            yield delta.abs_()
    return chunks


def _magnitude_sample(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    step = max(1, model.numel() // _SAMPLE)
    return (model[::step].float() - base[::step].float()).abs()


def kth_magnitudes(model: torch.Tensor, base: torch.Tensor, ranks: list[int], ws: Workspace
                   ) -> list[float]:
    """Exact |model - base| of each ascending rank, in one streamed pass (sample-bracketed)."""
    if len(ranks) <= native.MAX_RANKS and native.readable(model, base):
        return native.select_ranks(model, base, ranks)
    return kth_smallest_sampled(_magnitude_stream(model, base, ws), ranks, model.numel(),
                                _magnitude_sample(model, base), nonnegative=True)


def kept_count(n: int, density: float) -> int:
    """How many entries a magnitude or score trim keeps: k = max(1, int(density * n))."""
    return max(1, int(density * n))


def trim_rank(n: int, density: float) -> int:
    """Ascending rank of the lowest value kept (TIES' magnitudes, PCB's scores): the k-th largest."""
    return n - kept_count(n, density)


def count_magnitudes(models: Sequence[torch.Tensor], base: torch.Tensor, values: Sequence[float],
                     ws: Workspace) -> list[TieCount]:
    """Per model, its |model - base| below and equal to values[i] (`operators.ties`)."""
    if len(models) <= native.MAX_MODELS and native.readable(base, *models):
        return native.count_ties(base, list(models), values)
    return [count_chunks(lambda m=model: ((start, delta.abs_()) for start, _, delta
                                          in _delta_chunks(m, base, ws)), base.numel(), value)
            for model, value in zip(models, values, strict=True)]


def top_keeps(models: Sequence[torch.Tensor], base: torch.Tensor, densities: Sequence[float],
              ws: Workspace) -> list[Keep]:
    """TIES' trims of every model (density < 1; Keep() for the others): the k largest |delta|,
    ties at the threshold in index order. Thresholds and tie counts of all models in one fused
    pass each where the kernels read the inputs, model by model otherwise."""
    base = flat(base)
    models = [flat(m) for m in models]
    trimmed = [i for i, density in enumerate(densities) if density < 1]
    ranks = [trim_rank(base.numel(), densities[i]) for i in trimmed]
    found = None
    if trimmed and len(trimmed) <= native.MAX_MODELS \
            and native.readable(base, *(models[i] for i in trimmed)):
        found = native.magnitude_thresholds(base, [models[i] for i in trimmed], ranks)
    if found is None:
        found = [kth_magnitudes(models[i], base, [rank], ws)[0]
                 for i, rank in zip(trimmed, ranks, strict=True)]
    counts = count_magnitudes([models[i] for i in trimmed], base, found, ws) if trimmed else []
    keeps = [Keep() for _ in models]
    for i, threshold, count in zip(trimmed, found, counts, strict=True):
        window = count.window(0, kept_count(base.numel(), densities[i]), descending=True,
                              numel=base.numel())
        keeps[i] = Keep(band=(threshold, math.inf), windows=(window, None))
    return keeps


def outlier_keep(model: torch.Tensor, base: torch.Tensor, density: float, gamma: float,
                 ws: Workspace) -> Keep:
    """Breadcrumbs: ascending magnitude ranks [n_bot, n_bot + int(density * n)), ties at both
    edges in index order; with none kept, a zero mask."""
    n = model.numel()
    keep = int(density * n)
    if keep == 0:
        return Keep(mask=torch.zeros(n, device=model.device))
    bottom = max(0, n - keep - int(gamma * n))
    low, high = kth_magnitudes(model, base, [bottom, bottom + keep - 1], ws)
    at_low, at_high = count_magnitudes([model, model], base, [low, high], ws)
    windows = (at_low.window(bottom, keep, descending=False, numel=n),
               None if high == low else at_high.window(bottom, keep, descending=False, numel=n))
    return Keep(band=(low, high), windows=windows)


def mergekit_keep(model: torch.Tensor, base: torch.Tensor, method: Sparsifier, density: float,
                  gamma: float) -> Keep:
    """The entries mergekit 0.1.5 keeps, by its own calls: torch's unstable argsort of |delta|
    (float32), descending for TIES, ascending for breadcrumbs (a full sort of the tensor)."""
    n = model.numel()
    magnitude = (model.float() - base.float()).abs().reshape(-1)
    mask = torch.zeros(n, device=model.device)
    if method is Sparsifier.MAGNITUDE:
        mask[torch.argsort(magnitude, descending=True)[:kept_count(n, density)]] = 1
    else:
        keep = int(density * n)
        bottom = max(0, n - keep - int(gamma * n))
        mask[torch.sort(magnitude, descending=False).indices[bottom:bottom + keep]] = 1
    return Keep(mask=mask)


def random_mask(model: torch.Tensor, base: torch.Tensor, density: float, key: int,
                ws: Workspace, slot: str, l1: bool) -> tuple[torch.Tensor, float]:
    """DARE keep mask (a workspace buffer named `slot`) and, with `l1`, the L1 rescale factor."""
    n = model.numel()
    mask = ws.get(slot, n)
    width = min(n, CHUNK_ELEMENTS)
    bits, scratch = ws.get("rng-bits", width, torch.int32), ws.get("rng-scratch", width, torch.int32)
    spread = ws.constant("rng-spread", width, lambda size: rng.golden_spread(size, ws.device))
    if not l1:
        for start, stop in spans(n):
            rng.keep_mask(key, start, stop - start, density, out=mask[start:stop],
                          bits=bits[: stop - start], scratch=scratch[: stop - start], spread=spread)
        return mask, 1.0
    before = after = 0.0
    for start, stop, delta in _delta_chunks(model, base, ws):
        chunk_mask = rng.keep_mask(key, start, stop - start, density, out=mask[start:stop],
                                   bits=bits[: stop - start], scratch=scratch[: stop - start],
                                   spread=spread)
        delta.abs_()
        before += delta.sum(dtype=torch.float64).item()
        after += delta.mul_(chunk_mask).sum(dtype=torch.float64).item()
    return mask, _l1_factor(before, after)


def _l1_factor(before: float, after: float) -> float:
    return 1.0 if before < _L1_EPS or after < _L1_EPS else before / after


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities: linear in the magnitude rank within each row (mergekit's form;
    equal magnitudes ranked by index, as a stable sort ranks them)."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(torch.float32) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    normalized = ((ranks - low) / (high - low)).clamp(0, 1)
    return ((density - epsilon) + normalized * 2 * epsilon).reshape(delta.shape)


def l1_rescale(model: torch.Tensor, base: torch.Tensor, keep: Keep, ws: Workspace) -> float:
    """Factor that restores the L1 norm of delta after `keep` (float64 sums: any device)."""
    before = after = 0.0
    scratch, flags = ws.get("l1-scratch", CHUNK_ELEMENTS), ws.get("l1-flags", CHUNK_ELEMENTS)
    for start, stop, delta in _delta_chunks(model, base, ws):
        before += torch.abs(delta, out=scratch[: stop - start]).sum(dtype=torch.float64).item()
        keep.apply_(delta, start, stop, scratch[: stop - start], flags[: stop - start])
        after += delta.abs_().sum(dtype=torch.float64).item()
    return _l1_factor(before, after)


def sparsify(model: torch.Tensor, base: torch.Tensor, method: Sparsifier, *, density: float,
             gamma: float = 0.0, epsilon: float = 0.0, rescale: bool = False,
             rescale_mode: RescaleMode = RescaleMode.L1, key: int = 0,
             ws: Workspace | None = None, slot: str = "keep", known: Keep | None = None,
             tie_break: TieBreak = TieBreak.INDEX) -> Keep:
    """Decide the survivors of one task vector (model - base); `key` seeds random trims.

    Masks of random trims live in the workspace buffer `slot`: give each model its own slot.
    `known`: the magnitude trim when already decided for all models at once (`top_keeps`).
    `tie_break: mergekit` keeps, where a tie straddles a magnitude trim's boundary, the entries
    mergekit's argsort keeps (elsewhere the two rules keep the same entries).
    """
    ws = ws or Workspace(model.device)
    if density >= 1:
        return Keep()
    if method is Sparsifier.DELLA:  # ranks run along the rows of the tensor's own shape
        delta = model.float() - base.float()
        probabilities = della_probabilities(delta, density, epsilon).reshape(-1)
        uniforms = rng.uniform(key, 0, delta.numel(), delta.device)
        mask = (uniforms < probabilities).to(torch.float32)
        if rescale and rescale_mode is RescaleMode.INVERSE_P:
            return Keep(mask=mask / probabilities)
    model, base = flat(model), flat(base)
    l1 = rescale and rescale_mode is RescaleMode.L1
    if method is Sparsifier.RANDOM:
        if native.readable(model, base):  # the kernels draw the keeps where they apply them
            keep = Keep(draw=(key, density), scale=_l1_factor(
                *native.dare_l1_sums(model, base, key, density)) if l1 else 1.0)
        else:
            mask, scale = random_mask(model, base, density, key, ws, slot, l1)
            keep = Keep(mask=mask, scale=scale)
        if rescale and rescale_mode is RescaleMode.INVERSE_P:
            keep.scale = 1.0 / density
        return keep
    if method is Sparsifier.DELLA:
        keep = Keep(mask=mask)
    elif method is Sparsifier.MAGNITUDE:
        keep = known or top_keeps([model], base, [density], ws)[0]
    else:
        keep = outlier_keep(model, base, density, gamma, ws)
    if tie_break is TieBreak.MERGEKIT and keep.windows != (None, None):
        keep = mergekit_keep(model, base, method, density, gamma)
    if rescale:
        keep.scale = l1_rescale(model, base, keep, ws)
    return keep
