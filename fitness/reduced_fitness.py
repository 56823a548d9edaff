"""The fitness the evolution loop calls: candidates + budget → estimates with stderr, in one call.

A generation's candidates are scored in stages, all on the same items at each stage (paired: the
differences between near-identical siblings are measured on identical questions):

1. every candidate answers the reduced set (`items_per_task` per task) and gets an estimate ± stderr
   of its accuracy per task and overall;
2. a candidate whose optimistic accuracy (estimate + z·stderr, z = `Budget.promote_z`) is not
   dominated by the current front
   (accuracy up, size down) answers the larger promotion set, and is re-estimated;
3. a promoted candidate whose estimate is still not dominated is evaluated fully: on every item of
   the bank (exact there; its stderr is the bank's sampling error alone, zero when the bank is the
   whole search split). Its answers join the calibration matrix; the IRT model is refitted before
   the next call, so the model keeps learning the region the search explores.

All stages draw from the **item bank** (`bank`, `fitness.bank_items_per_task`): a uniform sample
of each task's search split on which the IRT model is calibrated. A bank of 100 items per task
makes calibration and full evaluations 4x cheaper on a 400-item split, at the price of its
sampling error, which every stderr carries (`fitness.reduced_sets.bank_variance`): the search
decides on estimates of the whole split, as the run reports them. (Leaving it out of promotion and
selection, where every candidate shares the bank, was measured too: it kept exact members on the
front more stubbornly; over three seeds of the zoo run its best held-out accuracy fell from
60.1 ± 0.4 to 57.3 ± 4.1 %, while the held-out hypervolume rose from 0.0585 to 0.0632.)

Answers are cached per candidate, so a later stage only asks the items it has not asked. Size
objectives (parameters, bytes at the export dtype, non-zero parameters) come back with the answers.

Each stage goes to the worker pool at once (`fitness.pool`: every candidate's job is submitted,
then results are consumed as they finish), so with several workers none waits for the stage's
slowest candidate longer than it must. The estimates depend only on the answers, never on the
order they arrived in: one worker or eight give the same results.

The same stages serve the engine's asynchronous steady-state mode one candidate at a time:
`stages()` fixes a batch's item sets and estimators, `job`/`receive` ask and consume one job, and
`estimate`, `promotable`, `finalist` and `full` take one candidate through its stages. A `journal`
hears every answer batch and every accepted failure at the moment it is consumed, in order, so a
resumed run can be served the same results in the same order (`fitness.journal`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from fitness.errors import (
    CandidateCodeError,
    CandidateOutOfMemory,
    CandidateTimeout,
    FitnessError,
    RecordedFailure,
    WorkerDied,
)
from fitness.estimators import (
    ESTIMATORS,
    Conventions,
    ReducedEstimators,
    calibrate,
    task_accuracies,
)
from fitness.irt import MODELS_PER_DIMENSION, IRTModel, fit_irt
from fitness.pool import Job, Pool
from fitness.reduced_sets import SELECTIONS, bank_variance, select_items
from fitness.size import Size
from operators.errors import MergeInputError, MergeParameterError
from operators.recipes import RecipeError

# errors that say something about one candidate, not about the run (see `_ask`)
CANDIDATE_ERRORS = (MergeInputError, MergeParameterError, RecipeError, CandidateOutOfMemory,
                    CandidateTimeout, WorkerDied, RecordedFailure, CandidateCodeError)
Progress = Callable[[int, int], None]  # (candidates done, of how many)
# hears each consumed job: its finished future, and the reason its candidate failed or None
Journal = Callable[[Job, Future, str | None], None]


def failure_reason(error: Exception) -> str:
    """How a failed candidate's error is stored: 'CandidateTimeout: …' (a replayed failure is
    already in that form)."""
    return str(error) if isinstance(error, RecordedFailure) else f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class Candidate:
    id: str
    recipe: dict
    parents: tuple[str, ...] = ()  # ids of the candidates it was bred from (a source model
    # is its seed candidate: mp-IRT combines the parents' abilities, and only a scored
    # candidate has one)


@dataclass(frozen=True)
class Budget:
    items_per_task: int = 20
    promote_items_per_task: int = 100
    max_full_per_call: int = 4
    selection: str = "random"
    estimator: str = "gpirt"
    promote_z: float = 2.0  # stderrs of optimism a reduced estimate gets to earn promotion
    full: bool = False  # every candidate answers every item: exact, no IRT (the baseline)

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise FitnessError(f"budget: unknown selection {self.selection!r}; use {SELECTIONS}")
        if self.estimator not in ESTIMATORS:
            raise FitnessError(f"budget: unknown estimator {self.estimator!r}; use {ESTIMATORS}")
        if not 1 <= self.items_per_task <= self.promote_items_per_task:
            raise FitnessError("budget: need 1 <= items_per_task <= promote_items_per_task")


@dataclass(frozen=True)
class FitnessResult:
    candidate_id: str
    objectives: dict[str, tuple[float, float]]  # name -> (value, stderr)
    stage: str  # "reduced", "promoted" or "full"
    asked: torch.Tensor  # bank indices of the items asked, in order
    answers: torch.Tensor  # 0/1 answers to them
    error: str | None = None  # why the candidate failed (stage "failed"); the run goes on

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Stages:
    """What one batch of candidates is asked: the reduced set and the promotion set, each with its
    estimators (a generation's, or in steady-state mode a batch of `population` children's)."""

    reduced: ReducedEstimators
    promoted: ReducedEstimators


@dataclass
class ReducedFitness:
    """Staged, paired, IRT-reduced fitness over a pool of items (see the module docstring).

    Everything lives on the item `bank` (`fitness.reduced_sets.item_bank`; default: the whole
    pool): the calibration matrix, the IRT model and the item sets have one column per bank item,
    and "full" means every bank item. Jobs, answers and the journal speak pool indices."""

    pool: Pool
    pool_task_of: torch.Tensor  # the task of every pool item
    task_names: tuple[str, ...]
    dims: int = 0  # 0: one per task
    seed: int = 0
    bank: torch.Tensor | None = None  # pool indices of the bank's items, sorted
    journal: Journal | None = None
    conventions: Conventions = field(default_factory=Conventions)
    calibration_ids: list[str] = field(default_factory=list)
    calibration_rows: list[torch.Tensor] = field(default_factory=list)
    calibration_parents: list[tuple[str, ...]] = field(default_factory=list)
    exact: dict[str, FitnessResult] = field(default_factory=dict)
    _irt: IRTModel | None = None
    _cache: dict[str, dict[int, float]] = field(default_factory=dict)
    _abilities: dict[str, torch.Tensor] = field(default_factory=dict)  # under the current fit
    _sizes: dict[str, Size] = field(default_factory=dict)
    _fitted_on: int = 0
    calls: int = 0
    task_of: torch.Tensor = field(init=False)  # the task of every bank item
    _position: dict[int, int] = field(init=False)  # pool index -> bank index

    def __post_init__(self) -> None:
        self.dims = self.dims or len(self.task_names)
        if self.bank is None:
            self.bank = torch.arange(len(self.pool_task_of))
        self.task_of = self.pool_task_of[self.bank]
        self._position = {item: local for local, item in enumerate(self.bank.tolist())}

    @property
    def whole_bank(self) -> torch.Tensor:
        """Every bank item: what a full evaluation asks."""
        return torch.arange(len(self.task_of))

    # -- answers, cached -------------------------------------------------------------------

    def job(self, candidate: Candidate, items: torch.Tensor, stage: str) -> Job | None:
        """The job that asks `candidate` the bank `items` it has not answered yet (and its size,
        the first time) for `stage` (calibration, reduced, promoted, full, final: what the run's
        item count is charged to); None when nothing is missing."""
        known = self._cache.setdefault(candidate.id, {})
        missing = tuple(dict.fromkeys(i for i in self.bank[items].tolist() if i not in known))
        if missing or candidate.id not in self._sizes:
            return Job(candidate.id, candidate.recipe, missing, stage=stage)
        return None

    def receive(self, job: Job, future: Future, guard: bool) -> str | None:
        """Consume a finished job: its answers are cached and journaled; returns why the
        candidate failed, or None. An error that belongs to the candidate (NaN weights, an
        invalid recipe or merge parameter, out of memory even at batch 1, over its time budget,
        a worker killed under it every time) marks it failed when `guard`, and the run goes on.
        Anything else (a programming error, a missing file, an out-of-memory while merging, any
        failure while calibrating) is raised: the run stops with its traceback, the answers
        consumed so far are in the store, and `evoforge resume` continues."""
        try:
            answers = future.result()
        except CANDIDATE_ERRORS as error:
            if not guard:
                raise
            reason = failure_reason(error)
            if self.journal is not None:
                self.journal(job, future, reason)
            return reason
        self._cache.setdefault(job.candidate_id, {}).update(
            zip(answers.items, answers.values, strict=True))
        self._sizes[job.candidate_id] = answers.size
        if self.journal is not None:
            self.journal(job, future, None)
        return None

    def _ask(self, requests: Sequence[tuple[Candidate, torch.Tensor]], guard: bool, stage: str,
             progress: Progress | None = None) -> dict[str, str]:
        """Every candidate's answers to its items, all jobs in the pool at once; returns the
        candidates that failed, with why (see `receive`)."""
        jobs = {}
        for candidate, items in requests:
            job = self.job(candidate, items, stage)
            if job is not None:
                jobs[self.pool.submit(job)] = job
        failed: dict[str, str] = {}
        for done, future in enumerate(self.pool.completed(list(jobs)), start=1):
            reason = self.receive(jobs[future], future, guard)
            if reason is not None:
                failed[jobs[future].candidate_id] = reason
            if progress is not None:
                progress(done, len(jobs))
        return failed

    def _answers(self, candidate: Candidate, items: torch.Tensor) -> torch.Tensor:
        known = self._cache[candidate.id]
        return torch.tensor([known[i] for i in self.bank[items].tolist()], dtype=torch.float64)

    # -- calibration -----------------------------------------------------------------------

    def add_full(self, candidates: Sequence[Candidate], stage: str = "calibration",
                 progress: Progress | None = None) -> list[FitnessResult]:
        """Evaluate the candidates on every bank item (all at once in the pool); they join the
        calibration matrix. Any failure stops the run (nothing here is guarded)."""
        self._ask([(c, self.whole_bank) for c in candidates], guard=False, stage=stage,
                  progress=progress)
        return [self._add_full(c) for c in candidates]

    def _add_full(self, candidate: Candidate) -> FitnessResult:
        every = self.whole_bank
        row = self._answers(candidate, every)
        if candidate.id not in self.calibration_ids:
            self.calibration_ids.append(candidate.id)
            self.calibration_rows.append(row)
            self.calibration_parents.append(candidate.parents)
        truth = task_accuracies(row[None], self.task_of)[0]
        self._abilities.pop(candidate.id, None)  # its answers grew
        result = FitnessResult(candidate.id, self._objectives(candidate, truth,
                                                              torch.zeros_like(truth)),
                               "full", every, row)
        self.exact[candidate.id] = result
        return result

    def exact_front(self) -> list[FitnessResult]:
        """The non-dominated members of everything evaluated fully so far."""
        known = list(self.exact.values())
        return [r for r in known if not _dominated(r, known)]

    def refit(self) -> None:
        needed = minimum_calibration(self.dims)
        if len(self.calibration_rows) < needed:
            raise FitnessError(
                f"{len(self.calibration_rows)} fully evaluated calibration candidates are too few"
                f" for a {self.dims}-dimensional IRT model; calibrate with at least {needed}")
        responses = torch.stack(self.calibration_rows)
        self._irt = fit_irt(responses, self.dims)
        self._fitted_on = len(self.calibration_rows)
        self._abilities.clear()  # abilities live on the fit's axes: each is refitted when asked

    def ability(self, candidate_id: str) -> torch.Tensor:
        """A scored candidate's IRT ability under the current fit, from every answer it has
        given (all items for a fully evaluated one). Computed when first asked after a refit, so
        a refit costs nothing for candidates no child names as a parent."""
        if candidate_id not in self._abilities:
            known = self._cache.get(candidate_id)
            if not known:
                raise FitnessError(
                    f"{candidate_id!r} has answered nothing, so it has no ability for its "
                    "children's mp-IRT; a parent must be a candidate scored before its child (a "
                    "source model enters as its seed candidate's id)")
            items = torch.tensor([self._position[i] for i in known])
            answers = torch.tensor(list(known.values()), dtype=torch.float64)
            self._abilities[candidate_id] = self.irt.fit_ability(answers, items)[0]
        return self._abilities[candidate_id]

    def _answer_row(self, candidate_id: str) -> torch.Tensor:
        """The candidate's answers over the bank, NaN where it was not asked."""
        row = torch.full((len(self.task_of),), float("nan"), dtype=torch.float64)
        known = self._cache.get(candidate_id, {})
        row[[self._position[i] for i in known]] = torch.tensor(list(known.values()),
                                                               dtype=torch.float64)
        return row

    @property
    def irt(self) -> IRTModel:
        if self._irt is None:
            raise FitnessError("the fitness is not calibrated; call add_full() with the seeds "
                               "and a batch of random candidates, then refit(), first")
        return self._irt

    # -- one batch, stage by stage -----------------------------------------------------------

    def stages(self, budget: Budget) -> Stages:
        """The item sets and estimators of the next batch of candidates (refitting the IRT model
        first if full evaluations joined the calibration since the last fit)."""
        if not self.calibration_rows:
            raise FitnessError("the fitness is not calibrated; call add_full() with the seeds "
                               "and a batch of random candidates, then refit(), first")
        if self._irt is None or len(self.calibration_rows) > self._fitted_on:
            self.refit()
        generation_seed = self.seed * 100_003 + self.calls
        self.calls += 1
        sets = [select_items(budget.selection, self.irt, self.task_of, size, generation_seed,
                             torch.stack([self.ability(c) for c in self.calibration_ids]),
                             torch.stack(self.calibration_rows))
                for size in (budget.items_per_task, budget.promote_items_per_task)]
        return Stages(*(self._estimators(reduced) for reduced in sets))

    def evaluate(self, candidates: Sequence[Candidate], budget: Budget,
                 front: Sequence[FitnessResult] | None = None,
                 on_candidate: Progress | None = None) -> list[FitnessResult]:
        """Estimates (± stderr) of every candidate's objectives; see the module docstring.

        `front` is what promotion must beat; by default, the non-dominated members of everything
        evaluated fully so far (calibration candidates included).
        """
        results: dict[str, FitnessResult] = {}

        def stage(name: str, chosen: Sequence[Candidate], items: torch.Tensor, estimate,
                  progress=None):
            failed = self._ask([(c, items) for c in chosen], guard=True, stage=name,
                               progress=progress)
            for c in chosen:
                results[c.id] = failed_result(c, failed[c.id]) if c.id in failed else estimate(c)

        if budget.full:
            stage("full", candidates, self.whole_bank, self.full, on_candidate)
            return [results[c.id] for c in candidates]
        stages = self.stages(budget)
        stage("reduced", candidates, stages.reduced.reduced.indices,
              lambda c: self.estimate(c, stages.reduced, budget, "reduced"), on_candidate)
        fronts = list(front) if front is not None else self.exact_front()
        promoted = [c for c in candidates
                    if promotable(results[c.id], fronts, budget.promote_z)]
        stage("promoted", promoted, stages.promoted.reduced.indices,
              lambda c: self.estimate(c, stages.promoted, budget, "promoted"))
        finalists = sorted((c for c in promoted if finalist(results[c.id], fronts)),
                           key=lambda c: -results[c.id].objectives["accuracy"][0])
        stage("full", finalists[:budget.max_full_per_call], self.whole_bank, self.full)
        return [results[c.id] for c in candidates]

    def _objectives(self, candidate: Candidate, means: torch.Tensor, stderr: torch.Tensor
                    ) -> dict[str, tuple[float, float]]:
        size = self._sizes[candidate.id]
        stderr = (stderr.pow(2) + bank_variance(means, self.task_of, self.pool_task_of)).sqrt()
        objectives = {"accuracy": (float(means[-1]), float(stderr[-1]))}
        objectives |= {f"accuracy/{name}": (float(means[t]), float(stderr[t]))
                       for t, name in enumerate(self.task_names)}
        return objectives | {"params": (float(size.params), 0.0),
                             "bytes": (float(size.bytes), 0.0),
                             "nonzero": (float(size.nonzero), 0.0)}

    def _estimators(self, reduced) -> ReducedEstimators:
        """The estimators of one stage's item set, their stderr calibrated by cross-fitting."""
        parent_rows = [[self._answer_row(p) for p in parents]
                       for parents in self.calibration_parents]
        excess = calibrate(torch.stack(self.calibration_rows), self.task_of, reduced,
                           parent_rows, self.dims, seed=self.seed, conventions=self.conventions)
        return ReducedEstimators(self.irt, self.task_of, reduced, excess, self.conventions)

    def estimate(self, candidate: Candidate, estimators: ReducedEstimators, budget: Budget,
                 stage: str) -> FitnessResult:
        """The candidate's estimate from its answers to the stage's items."""
        reduced = estimators.reduced
        answers = self._answers(candidate, reduced.indices)
        parents = [self.ability(p) for p in candidate.parents]
        estimate = estimators.estimate(budget.estimator, answers,
                                       torch.stack(parents) if parents else None)
        self._abilities.pop(candidate.id, None)  # its answers grew
        return FitnessResult(candidate.id, self._objectives(candidate, estimate.mean,
                                                            estimate.stderr),
                             stage, reduced.indices, answers)

    def full(self, candidate: Candidate) -> FitnessResult:
        """The exact result of a candidate that has answered every bank item; it joins the
        calibration matrix (the next `stages()` refits on it)."""
        return self._add_full(candidate)


def minimum_calibration(dims: int) -> int:
    """Fully evaluated candidates a `dims`-dimensional IRT fit needs (5-fold cross-fits)."""
    return math.ceil(MODELS_PER_DIMENSION * (dims + 1) * 5 / 4)


def promotable(result: FitnessResult, front: Sequence[FitnessResult], z: float = 2.0) -> bool:
    """Does the reduced estimate earn the promotion set? Its optimistic accuracy (+z stderr) must
    not be dominated by the front."""
    return result.ok and not _dominated(result, front, optimism=z)


def finalist(result: FitnessResult, front: Sequence[FitnessResult]) -> bool:
    """Does the promoted estimate earn a full evaluation? It must not be dominated as it is."""
    return result.ok and not _dominated(result, front)


def failed_result(candidate: Candidate, error: str) -> FitnessResult:
    empty = torch.zeros(0)
    return FitnessResult(candidate.id, {}, "failed", empty, empty, error)


def _dominated(result: FitnessResult, front: Sequence[FitnessResult],
               optimism: float = 0.0) -> bool:
    """Is `result`, its accuracy raised by `optimism` stderrs, dominated (accuracy up, params
    down) by a member of `front`?"""
    accuracy, stderr = result.objectives["accuracy"]
    accuracy += optimism * stderr
    params = result.objectives["params"][0]
    for member in front:
        other, other_params = member.objectives["accuracy"][0], member.objectives["params"][0]
        if other >= accuracy and other_params <= params and (other > accuracy
                                                             or other_params < params):
            return True
    return False
