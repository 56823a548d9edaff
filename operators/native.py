"""Optional fused CPU kernels, compiled from `native_kernels.c` on first use.

Why: eager torch runs one pass over memory per operation, and on a CPU its boolean and selection
kernels are slow (a TIES merge is ~30 passes plus an exact top-k per tensor). The C kernels do the
same arithmetic in one pass over L1-sized blocks, and find exact order statistics with a two-level
radix histogram. They mirror the eager code operation for operation with IEEE single-precision
ops and no FMA contraction, so both paths give bit-identical results (tests check this).

How: the source is compiled with the system C compiler (``cc -O3 -march=native -fopenmp``, see
`_FLAGS`) into EVOFORGE_CACHE/native/<hash>/ and loaded with ctypes; there are no torch headers
involved, so the build takes about a second, once per machine. Without a compiler, or with
EVOFORGE_NATIVE=0, every caller falls back to the eager torch path. GPU tensors always take the
eager path.

Inputs: the models and base of a merge may be float32 or bfloat16 (`readable`); the kernels widen
bfloat16 block by block (exactly: it is a float32's top half) and always return float32, so a bf16
run reads its memory-mapped checkpoints in place instead of holding a float32 copy of each input.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch

from operators import rng
from operators.cache import cache_dir
from operators.errors import NonFiniteInput
from operators.quantiles import bracket_ranks
from operators.ties import TieCount, TieWindow, blocks

_SOURCE = Path(__file__).with_name("native_kernels.c")
# -fno-trapping-math changes no value (it drops only FP-exception bookkeeping); without it GCC
# keeps the kernels' selects as branches and leaves them scalar on AVX2-only CPUs (AVX-512 masks
# hide this): PCB ran 5x and TIES 3x slower on an AMD EPYC than with it.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", "-fPIC",
          "-shared"]
MAX_MODELS = 32
MAX_RANKS = 4
EXTREME_COUNT = 1 << 16  # largest heap for `magnitude_extremes`
SAMPLE = 1 << 14  # sampled entries behind the selection brackets (a multiple of 16)
FUSED_SELECT_MIN = 8 * SAMPLE  # entries; below this, selection by sample brackets does not pay
_SCORE_MAGNITUDE, _SCORE_PCB = 0, 1  # score kinds of the kernels' scores_select


class _MergeOptions(ctypes.Structure):
    _fields_ = [("n_models", ctypes.c_int), ("consensus", ctypes.c_int),
                ("weight_before_election", ctypes.c_int), ("normalize", ctypes.c_int),
                ("lam", ctypes.c_float), ("weight_total", ctypes.c_float)]


def _cpu_signature() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{flags}"


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_signature().encode())
    target = cache_dir() / "native" / digest.hexdigest()[:16] / "kernels.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / "kernels.so"
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"], check=True,
                       capture_output=True, text=True)
        os.replace(built, target)  # atomic: concurrent builders never see a partial file
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, no compiler, or a failed build: warned once)."""
    if os.environ.get("EVOFORGE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"evoforge: native merge kernels unavailable, using torch ops ({detail})",
                      stacklevel=2)
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # every (base, models) pair of pointers is followed by the inputs' format (`_format`)
    lib.select_ranks.argtypes = [pointer, pointer, i32, i64, pointer, i32, pointer, i32]
    lib.select_ranks.restype = i32
    lib.merge_task_vectors.argtypes = [pointer, pointer, i32, pointer, pointer, pointer, pointer,
                                       pointer, pointer, pointer, pointer, pointer, pointer,
                                       ctypes.POINTER(_MergeOptions), i64, pointer, i32]
    lib.dare_l1_sums.argtypes = [pointer, pointer, i32, i64, ctypes.c_int32, ctypes.c_int32,
                                 pointer, i32]
    floats = ctypes.POINTER(ctypes.c_float)
    lib.pcb_scores.argtypes = [pointer, pointer, i32, i32, i64, floats, floats, floats, floats,
                               pointer, i32]
    lib.pcb_mix.argtypes = [pointer, pointer, i32, i32, i64, floats, floats, pointer, floats,
                            floats, floats, ctypes.c_float, pointer, pointer, pointer, pointer,
                            i32]
    lib.pcb_mix_recomputed.argtypes = [pointer, pointer, i32, i32, i64, floats, floats, floats,
                                       floats, floats, floats, floats, ctypes.c_float, pointer,
                                       pointer, pointer, pointer, i32]
    lib.count_ties.argtypes = [i32, pointer, pointer, i32, i32, i64, floats, floats, floats,
                               floats, floats, pointer, pointer, pointer, i32]
    lib.count_ties.restype = i32
    lib.scores_sample_brackets.argtypes = [i32, pointer, pointer, i32, i32, i64, floats, floats,
                                           floats, floats, i64, pointer, pointer, floats, floats,
                                           i32]
    lib.scores_sample_brackets.restype = i64
    lib.scores_select.argtypes = [i32, pointer, pointer, i32, i32, i64, floats, floats, floats,
                                  floats, pointer, floats, floats, i64, floats, floats, i32]
    lib.scores_select.restype = i32
    lib.scores_radix_select.argtypes = [i32, pointer, pointer, i32, i32, i64, floats, floats,
                                        floats, floats, pointer, floats, floats, i32]
    lib.scores_radix_select.restype = i32
    lib.magnitude_extremes.argtypes = [pointer, pointer, i32, i32, i64, i64, i64, floats, floats,
                                       i32]
    lib.magnitude_extremes.restype = i32
    return lib


_INPUT_FORMATS = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' `bf16` argument


def _contiguous_cpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.is_contiguous()


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors as float32 data (scores, masks): contiguous
    float32 on the CPU."""
    return library() is not None and all(
        t is None or (_contiguous_cpu(t) and t.dtype == torch.float32) for t in tensors)


def readable(*inputs: torch.Tensor) -> bool:
    """Whether the kernels can read these merge inputs (a base and its models): contiguous CPU
    tensors, all float32 or all bfloat16. bfloat16 is widened block by block inside the kernels,
    exactly, so no float32 copy of an input is ever made; results are float32."""
    return library() is not None and bool(inputs) and all(
        _contiguous_cpu(t) and t.dtype == inputs[0].dtype for t in inputs) \
        and inputs[0].dtype in _INPUT_FORMATS


def _format(tensor: torch.Tensor) -> int:
    return _INPUT_FORMATS[tensor.dtype]


def _result(base: torch.Tensor) -> torch.Tensor:
    """The float32 output buffer of a merge kernel over `base`'s entries."""
    return torch.empty(base.shape, dtype=torch.float32)


def _pointers(tensors: Sequence[torch.Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(0 if t is None else t.data_ptr() for t in tensors))


def select_ranks(values: torch.Tensor, minus: torch.Tensor | None, ranks: Sequence[int]
                 ) -> list[float]:
    """Exact ascending-rank values of `values` (or of |values - minus|, both in one format), as
    float32 numbers."""
    ranks_array = (ctypes.c_int64 * len(ranks))(*ranks)
    out = (ctypes.c_float * len(ranks))()
    status = library().select_ranks(
        values.data_ptr(), None if minus is None else minus.data_ptr(), _format(values),
        values.numel(),
        ranks_array, len(ranks), out, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"native select_ranks refused {len(ranks)} ranks of {values.numel()}")
    return list(out)


def _windows(windows: Sequence[TieWindow | None]) -> tuple[ctypes.Array, ctypes.Array,
                                                             ctypes.Array | None]:
    """The kernels' tie-window arrays (skip, take, prefix pointers; None when no window)."""
    n = len(windows)
    skips = (ctypes.c_int64 * n)(*(w.skip if w else 0 for w in windows))
    takes = (ctypes.c_int64 * n)(*(w.take if w else 0 for w in windows))
    if not any(windows):
        return skips, takes, None
    return skips, takes, _pointers([w.prefix if w else None for w in windows])


def merge_task_vectors(base: torch.Tensor, models: Sequence[torch.Tensor],
                       bands: Sequence[tuple[float, float] | None],
                       windows: Sequence[tuple[TieWindow | None, TieWindow | None]],
                       masks: Sequence[torch.Tensor | None],
                       draws: Sequence[tuple[int, float] | None], scales: Sequence[float],
                       weights: Sequence[float], consensus: int, weight_before_election: bool,
                       normalize: bool, lam: float, weight_total: float) -> torch.Tensor:
    """The fused form of `operators.task_arithmetic.merge_task_vectors` (float32 result; masks
    float32); `draws[i]` = (stream key, keep probability) of model i's DARE draw, made on the fly;
    `windows[i]`: the tie windows of model i's band edges (low, high)."""
    n = len(models)
    floats, ints = ctypes.c_float * n, ctypes.c_int32 * n
    options = _MergeOptions(n, consensus, int(weight_before_election), int(normalize), lam,
                            weight_total)
    out = _result(base)
    library().merge_task_vectors(
        base.data_ptr(), _pointers(models), _format(base),
        floats(*(band[0] if band else 0.0 for band in bands)),
        floats(*(band[1] if band else -1.0 for band in bands)),
        *_windows([edge for pair in windows for edge in pair]),
        _pointers(masks), ints(*(draw[0] if draw else 0 for draw in draws)),
        ints(*(rng.keep_threshold(draw[1]) if draw else -1 for draw in draws)),
        floats(*scales), floats(*weights), ctypes.byref(options), base.numel(), out.data_ptr(),
        torch.get_num_threads())
    return out


def dare_l1_sums(model: torch.Tensor, base: torch.Tensor, key: int, probability: float
                 ) -> tuple[float, float]:
    """sum |model - base| and its sum over the entries DARE's draw keeps, in float64."""
    sums = (ctypes.c_double * 2)()
    library().dare_l1_sums(base.data_ptr(), model.data_ptr(), _format(base), base.numel(), key,
                           rng.keep_threshold(probability), sums, torch.get_num_threads())
    return sums[0], sums[1]


def _floats(values: Sequence[float]) -> ctypes.Array:
    return (ctypes.c_float * len(values))(*values)


def pcb_scores(base: torch.Tensor, models: Sequence[torch.Tensor],
               bounds: Sequence[tuple[float, float]], low2: Sequence[float],
               factors: Sequence[float], scores: torch.Tensor) -> None:
    """Fill scores[i] with PCB's tanh-mode scores, as `operators.pcb` computes them."""
    library().pcb_scores(base.data_ptr(), _pointers(models), _format(base), len(models),
                         base.numel(),
                         _floats([b[0] for b in bounds]), _floats([b[1] for b in bounds]),
                         _floats(low2), _floats(factors), _pointers(list(scores)),
                         torch.get_num_threads())


def pcb_mix(base: torch.Tensor, models: Sequence[torch.Tensor],
            bounds: Sequence[tuple[float, float]], scores: torch.Tensor,
            thresholds: Sequence[float], windows: Sequence[TieWindow | None],
            inverse_spans: Sequence[float], weights: Sequence[float], lam: float
            ) -> torch.Tensor:
    """PCB's balanced mean and base + lambda * merged (see `operators.pcb`); `windows[i]`: which
    of model i's entries scored exactly at its threshold are kept (None: all)."""
    n = len(models)
    out = _result(base)
    library().pcb_mix(base.data_ptr(), _pointers(models), _format(base), n, base.numel(),
                      _floats([b[0] for b in bounds]), _floats([b[1] for b in bounds]),
                      _pointers(list(scores)), _floats(thresholds), _floats(inverse_spans),
                      _floats(weights), lam, *_windows(windows), out.data_ptr(),
                      torch.get_num_threads())
    return out


def magnitude_extremes(base: torch.Tensor, models: Sequence[torch.Tensor], count_low: int,
                       count_high: int) -> list[tuple[float, float]] | None:
    """Per model, the `count_low`-th smallest and `count_high`-th largest |model - base|, in
    one pass over all models (bounded heaps); None if the counts are too large for heaps.
    Raises `NonFiniteInput` if an input holds NaN/Inf: the pass checks them on the way."""
    if max(count_low, count_high) > EXTREME_COUNT:
        return None
    n = len(models)
    low, high = (ctypes.c_float * n)(), (ctypes.c_float * n)()
    status = library().magnitude_extremes(base.data_ptr(), _pointers(models), _format(base), n,
                                          base.numel(), count_low, count_high, low, high,
                                          torch.get_num_threads())
    if status == 2:
        raise NonFiniteInput("an input tensor holds NaN/Inf values (or model - base overflows)")
    return list(zip(low, high, strict=True)) if status == 0 else None


def _select_scores(kind: int, base: torch.Tensor, models: Sequence[torch.Tensor],
                   ranks: Sequence[int], pcb: tuple[list, list, list, list] | None = None
                   ) -> tuple[list[float], list[float]] | None:
    """Each model's score at ascending rank `ranks[i]` and its largest score, scores computed on
    the fly and never stored: in one pass within sample brackets (`scores_select`), or, where a
    bracket misses (ties: bf16 task vectors take few values), in two radix passes
    (`scores_radix_select`). None when the tensor is too small for either to pay."""
    n, numel = len(models), base.numel()
    if numel < FUSED_SELECT_MIN:
        return None
    constants = [None] * 4 if pcb is None else [_floats(values) for values in pcb]
    sample_ranks = [bracket_ranks(rank, numel, SAMPLE) for rank in ranks]
    low, high = (ctypes.c_float * n)(), (ctypes.c_float * n)()
    inside = library().scores_sample_brackets(
        kind, base.data_ptr(), _pointers(models), _format(base), n, numel, *constants, SAMPLE,
        (ctypes.c_int64 * n)(*(r[0] for r in sample_ranks)),
        (ctypes.c_int64 * n)(*(r[1] for r in sample_ranks)), low, high, torch.get_num_threads())
    if inside < 0:
        raise MemoryError(f"score sample of {SAMPLE} entries x {n} models: out of memory")
    thresholds, maxima = (ctypes.c_float * n)(), (ctypes.c_float * n)()
    status = library().scores_select(
        kind, base.data_ptr(), _pointers(models), _format(base), n, numel, *constants,
        (ctypes.c_int64 * n)(*ranks), low, high, 2 * inside * (numel // SAMPLE) + 4096,
        thresholds, maxima, torch.get_num_threads())
    if status != 0:
        status = library().scores_radix_select(
            kind, base.data_ptr(), _pointers(models), _format(base), n, numel, *constants,
            (ctypes.c_int64 * n)(*ranks), thresholds, maxima, torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"radix counters for {n} models: out of memory")
    return list(thresholds), list(maxima)


def magnitude_thresholds(base: torch.Tensor, models: Sequence[torch.Tensor],
                         ranks: Sequence[int]) -> list[float] | None:
    """Each model's |model - base| at ascending rank `ranks[i]`, all models in one pass (TIES'
    trim thresholds); None for tensors too small to sample (select model by model, then)."""
    found = _select_scores(_SCORE_MAGNITUDE, base, models, ranks)
    return None if found is None else found[0]


def pcb_thresholds(base: torch.Tensor, models: Sequence[torch.Tensor],
                   bounds: Sequence[tuple[float, float]], low2: Sequence[float],
                   factors: Sequence[float], ranks: Sequence[int]
                   ) -> tuple[list[float], list[float]]:
    """Each model's PCB drop threshold (score at ascending rank `ranks[i]`) and largest score,
    without storing the scores (tensors of at least FUSED_SELECT_MIN entries)."""
    pcb = ([b[0] for b in bounds], [b[1] for b in bounds], list(low2), list(factors))
    return _select_scores(_SCORE_PCB, base, models, ranks, pcb)


def pcb_mix_recomputed(base: torch.Tensor, models: Sequence[torch.Tensor],
                       bounds: Sequence[tuple[float, float]], low2: Sequence[float],
                       factors: Sequence[float], thresholds: Sequence[float],
                       windows: Sequence[TieWindow | None], inverse_spans: Sequence[float],
                       weights: Sequence[float], lam: float) -> torch.Tensor:
    """`pcb_mix` with the scores recomputed block by block instead of read from memory."""
    out = _result(base)
    library().pcb_mix_recomputed(
        base.data_ptr(), _pointers(models), _format(base), len(models), base.numel(),
        _floats([b[0] for b in bounds]), _floats([b[1] for b in bounds]), _floats(low2),
        _floats(factors), _floats(thresholds), _floats(inverse_spans), _floats(weights), lam,
        *_windows(windows), out.data_ptr(), torch.get_num_threads())
    return out


def count_ties(base: torch.Tensor, models: Sequence[torch.Tensor], values: Sequence[float],
               pcb: tuple[list, list, list, list] | None = None) -> list[TieCount]:
    """For each model, its scores (|model - base|, or PCB's with `pcb` = its clip bounds and
    score constants) below and equal to values[i], with the equal ones' block prefix."""
    n, numel = len(models), base.numel()
    prefixes = [torch.empty(blocks(numel) + 1, dtype=torch.int64) for _ in range(n)]
    below, equal = (ctypes.c_int64 * n)(), (ctypes.c_int64 * n)()
    constants = [None] * 4 if pcb is None else [_floats(v) for v in pcb]
    status = library().count_ties(
        _SCORE_MAGNITUDE if pcb is None else _SCORE_PCB, base.data_ptr(), _pointers(models),
        _format(base), n, numel, *constants, _floats(values), _pointers(prefixes), below, equal,
        torch.get_num_threads())
    if status != 0:
        raise ValueError(f"native count_ties refused {n} models")
    return [TieCount(below[i], equal[i], prefixes[i]) for i in range(n)]
