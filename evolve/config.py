"""The run config: YAML, validated with errors that name the key and say what is allowed."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fitness.estimators import BLEND_RULES, ESTIMATORS, ONE_PARENT_RULES
from fitness.reduced_fitness import minimum_calibration
from fitness.reduced_sets import SELECTIONS
from operators.llm_client import Endpoint
from operators.sandbox import Limits
from search_spaces.merge_space import DEFAULT_MERGES, METHODS


class ConfigError(ValueError):
    """The run config is invalid; the message names the key and what is allowed."""


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10,
          "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB', '500 MB', '1.5e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write bytes or e.g. 24GiB, 500MB")
    return int(float(match.group(1)) * _UNITS[unit])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sources(_Strict):
    base: str = Field(description="the experts' common base model (zoo name or local folder)")
    experts: list[str] = Field(min_length=2, description="fine-tunes of the base to breed")


class Rate(_Strict):
    rate: float = Field(ge=0, le=1)


class Crossover(Rate):
    rate: float = Field(0.6, ge=0, le=1)
    compose: float = Field(0.2, ge=0, le=1, description="share of crossovers that merge the "
                           "parents' recipes (children of children) instead of mixing genes")


class LLM(_Strict):
    """An OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's server, Ollama, a
    hosted API). The key is read from the environment variable named here, never stored."""
    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str
    api_key_env: str | None = Field(None, description="environment variable holding the API "
                                    "key (none for a local server)")
    timeout: float = Field(120, gt=0, description="seconds to wait for one reply")
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(2048, ge=1)

    def endpoint(self) -> Endpoint:
        return Endpoint(self.base_url, self.model, self.api_key_env, self.timeout,
                        self.temperature, self.max_tokens)


PROPOSERS = ("heuristic", "llm")


class _Proposed(_Strict):
    """Who writes a section's children: the heuristic, or an LLM (one repair round, then the
    heuristic as fallback). `llm` is given exactly when the proposer is the LLM: a key nothing
    would read is an error, not a silent default."""

    section: ClassVar[str]  # the config path, for the messages
    proposer: Literal[PROPOSERS] = Field(  # type: ignore[valid-type]
        "heuristic", description="who writes children: the heuristic, or an LLM (with one repair "
        "round, then the heuristic as fallback)")
    llm: LLM | None = None

    @model_validator(mode="after")
    def _endpoint(self) -> _Proposed:
        if self.proposer == "llm" and self.llm is None:
            raise ValueError(f"{self.section}.proposer: llm needs {self.section}.llm (base_url "
                             "and model)")
        if self.proposer == "heuristic" and self.llm is not None:
            raise ValueError(f"{self.section}.llm is read only with {self.section}.proposer: llm")
        return self


class Edit(Rate, _Proposed):
    section: ClassVar[str] = "operators.edit"
    rate: float = Field(0.15, ge=0, le=1)
    prune: float = Field(0.5, ge=0, le=1, description="share of the heuristic's edits that prune "
                         "MLP width or key/value head groups (where the model has them) instead "
                         "of changing depth")


class Operators(_Strict):
    """Each child comes from one operator: crossover, an edit or weight noise by their rates, and
    otherwise mutation of the merge genes, which takes the share the three leave."""

    crossover: Crossover = Crossover()
    weight_noise: Rate = Rate(rate=0.1)
    edit: Edit = Edit()
    methods: list[Literal[METHODS]] = list(METHODS)  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _mutation_takes_the_rest(cls, data):
        if isinstance(data, dict) and "mutation" in data:
            raise ValueError("operators.mutation has no rate of its own: mutation of the merge "
                             "genes takes the share the other operators leave (1 - crossover - "
                             "edit - weight_noise); remove the key and set those three")
        return data

    @model_validator(mode="after")
    def _shares(self) -> Operators:
        taken = self.crossover.rate + self.edit.rate + self.weight_noise.rate
        if taken > 1 + 1e-9:
            raise ValueError(f"operators: crossover {self.crossover.rate:g} + edit "
                             f"{self.edit.rate:g} + weight_noise {self.weight_noise.rate:g} = "
                             f"{taken:g}; they are shares of the children and must sum to at "
                             "most 1 (mutation takes the rest)")
        return self


class EstimatorConventions(_Strict):
    """mp-IRT's and the blends' conventions; MERGE³'s released code is lambda_prior: false,
    one_parent: parent, blend: half (see `fitness.estimators`)."""

    lambda_prior: bool = Field(True, description="a N(1/K, 1) prior on mp-IRT's coefficients "
                               "(false: MERGE³'s maximum likelihood)")
    one_parent: Literal[ONE_PARENT_RULES] = Field(  # type: ignore[valid-type]
        "scale", description="a child of one parent: fit c·θ (scale) or take θ as is (parent, "
        "MERGE³)")
    blend: Literal[BLEND_RULES] = Field(  # type: ignore[valid-type]
        "variance", description="gp-IRT/gmp-IRT blend: by calibrated variances, or half and "
        "half (MERGE³)")


class Fitness(_Strict):
    calibration: int = Field(40, ge=0, description="random recipes evaluated fully at start "
                             "(besides the seeds and default merges); the run config checks "
                             "that the IRT model gets enough")
    items_per_task: int = Field(20, ge=1)
    promote_items_per_task: int = Field(100, ge=1)
    bank_items_per_task: int | None = Field(
        100, ge=1, description="the item bank: a uniform sample of each task's search split that "
        "calibration, the item sets and full evaluations use (its sampling error is in every "
        "reported stderr); a task with fewer items is used whole; null: the whole split")
    max_full_per_generation: int = Field(3, ge=0)
    promote_z: float = Field(2.0, ge=0, description="a child earns the promotion set when its "
                             "accuracy estimate plus this many stderrs is not dominated")
    selection: Literal[SELECTIONS] = "random"  # type: ignore[valid-type]
    estimator: Literal[ESTIMATORS] = "gpirt"  # type: ignore[valid-type]
    dims: int = Field(0, ge=0, description="IRT dimensions; 0 = one per task")
    conventions: EstimatorConventions = EstimatorConventions()
    full_evaluation: bool = Field(False, description="every candidate answers the whole search "
                                  "split (exact fitness, no IRT): the baseline reduced fitness "
                                  "is measured against; the other keys but calibration are unread")

    @model_validator(mode="after")
    def _sets_fit_the_bank(self) -> Fitness:
        if self.full_evaluation:  # no reduced sets, no bank: the keys are unread
            return self
        bank = self.bank_items_per_task
        if not self.items_per_task <= self.promote_items_per_task <= (bank or math.inf):
            raise ValueError(
                f"fitness: items_per_task ({self.items_per_task}) <= promote_items_per_task "
                f"({self.promote_items_per_task}) <= bank_items_per_task ({bank}) must hold: "
                "each set is drawn from the next")
        return self


class LmEval(_Strict):
    include_path: list[str] = Field([], description="folders of lm-eval task YAMLs (offline)")
    metric: str | None = Field(None, description="a 0/1 metric of the tasks (default: acc for "
                               "multiple choice, exact_match for generation)")


class Ray(_Strict):
    address: str | None = Field(None, description="join this Ray cluster ('auto', or "
                                "'ray://host:10001'); default: start a local Ray with this "
                                "machine's CPUs and GPUs")
    gpus_per_worker: float = Field(1, gt=0, description="GPUs each worker holds (2 for a model "
                                   "that needs two; 0.5 to put two workers on one GPU); only "
                                   "with device: cuda")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker holds (its torch "
                                   "threads)")


class Sandbox(_Strict):
    """Limits of the sandbox every code candidate is trained in (`operators.sandbox`)."""
    cpu_seconds: int = Field(600, ge=1, description="CPU seconds one candidate may use")
    wall_seconds: float = Field(900, gt=0, description="wall-clock seconds one candidate may take")
    memory: int = Field(3 * 2**30, gt=0, description="address space of the sandboxed process "
                        "('3GiB'; torch alone maps about 0.7 GB)")

    @field_validator("memory", mode="before")
    @classmethod
    def _byte_size(cls, value):
        return parse_bytes(value) if isinstance(value, str) else value

    def limits(self) -> Limits:
        return Limits(cpu_seconds=self.cpu_seconds, wall_seconds=self.wall_seconds,
                      memory_bytes=self.memory)


class CodeSearch(_Proposed):
    """A code search (`search_space: mnist1d-code`): how children are written and trained."""
    section: ClassVar[str] = "code"
    steps: int = Field(6000, ge=1, description="training steps (batches of 100) per candidate; "
                       "6,000 is how the MNIST-1D paper and the NAS zoo train the references")
    sandbox: Sandbox = Sandbox()


CODE_SPACES = ("mnist1d-code",)


class RunConfig(_Strict):
    search_space: Literal["merge", "mnist1d-code"] = Field(
        "merge", description="merge: recipes over sources' checkpoints; mnist1d-code: PyTorch "
        "module source for MNIST-1D, trained in a sandbox")
    sources: Sources | None = None
    tasks: list[str] = []
    code: CodeSearch | None = None
    lm_eval: LmEval = LmEval()
    objectives: dict[str, Literal["max", "min"]] = {"accuracy": "max", "params": "min"}
    operators: Operators = Operators()
    population: int = Field(16, ge=4)
    generations: int = Field(8, ge=1)
    evaluations: int | None = Field(None, ge=1, description="the run's budget in candidates "
                                    "bred and evaluated (calibration aside); replaces "
                                    "generations: the last generation may be smaller")
    fitness: Fitness = Fitness()
    strategy: Literal["ga", "cmaes", "tpe", "nsga2"] = "ga"
    mode: Literal["generational", "steady-state"] = Field(
        "generational", description="generational: a generation's children are bred and scored "
        "together; steady-state: one child per worker in flight, each joins the population as "
        "soon as it is scored and frees its worker for the next (no worker waits for a "
        "generation's straggler)")
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="what candidates are scored and exported in; default: the sources'")
    memory_budget: int | None = Field(
        None, gt=0, description="bytes a worker may hold besides the mapped sources (resident "
        "model + sub-recipe cache); '24GiB' or '500MB' work too; default: half the RAM on a "
        "CPU, 90 % of the GPU's memory (sources included) on a GPU")

    workers: int = Field(1, ge=1, description="evaluation workers (one per GPU); more than one "
                         "means the Ray backend")
    backend: Literal["local", "ray"] | None = Field(
        None, description="local (in this process) or ray (actors); default: ray for more than "
        "one worker")
    ray: Ray = Ray()
    candidate_timeout: float | None = Field(
        None, gt=0, description="seconds one candidate's job may take on a Ray worker before it "
        "is cancelled (the worker restarted) and the candidate marked failed")
    worker_retries: int = Field(2, ge=0, description="how many more times a job runs on a new "
                                "worker after its Ray worker died under it")

    @model_validator(mode="before")
    @classmethod
    def _code_defaults(cls, data):
        """A code search evaluates every candidate on the whole search split (training is the
        cost, not the items) and starts from its references alone unless told otherwise."""
        if isinstance(data, dict) and data.get("search_space") in CODE_SPACES:
            fitness = dict(data.get("fitness") or {})
            if fitness.get("full_evaluation") is False:
                raise ValueError("fitness.full_evaluation: a code search scores every candidate "
                                 "on the whole search split; remove the key")
            data = data | {"fitness": {"calibration": 0} | fitness | {"full_evaluation": True},
                           "code": data.get("code") or {}}
        return data

    @model_validator(mode="after")
    def _space_keys(self) -> RunConfig:
        """The keys each search space reads, and no others."""
        if self.search_space == "merge":
            if self.sources is None:
                raise ValueError("sources: a merge run needs sources (base and experts)")
            if not self.tasks:
                raise ValueError("tasks: a merge run needs at least one task")
            if self.code is not None:
                raise ValueError("code: only a code search (search_space: mnist1d-code) reads it")
            return self
        unread = [key for key in ("sources", "dtype", "memory_budget", "lm_eval", "ray",
                                  "candidate_timeout") if key in self.model_fields_set]
        unread += [f"operators.{key}" for key in self.operators.model_fields_set
                   if key != "crossover"]
        if unread:
            raise ValueError(f"{', '.join(unread)}: not read by a code search; remove them "
                             "(its children come from crossover, and mutation takes the rest)")
        if self.tasks not in ([], ["nas/mnist1d"]):
            raise ValueError(f"tasks: {self.search_space} is scored on nas/mnist1d; remove the key")
        if self.strategy != "ga" or self.workers != 1 or self.uses_ray or self.device != "cpu":
            raise ValueError("a code search runs the GA with one local worker on the CPU "
                             "(strategy: ga, workers: 1, device: cpu): its candidates train one "
                             "at a time in the sandbox")
        self.tasks = ["nas/mnist1d"]
        return self

    @model_validator(mode="after")
    def _edits_are_read(self) -> RunConfig:
        """Only the GA makes edit children: an LLM endpoint for edits under a gene strategy
        would never be asked (the run's own config.yaml, which lists every key at its value, is
        loaded through here too, so defaults must pass)."""
        if self.strategy != "ga" and self.operators.edit.proposer == "llm":
            raise ValueError(f"operators.edit.proposer: llm: strategy {self.strategy} breeds no "
                             "edit children (only ga does); use strategy: ga or remove it")
        return self

    @model_validator(mode="after")
    def _one_local_worker(self) -> RunConfig:
        if self.backend == "local" and self.workers > 1:
            raise ValueError(f"workers: {self.workers} needs backend: ray (the local backend is "
                             "one worker in this process)")
        return self

    @model_validator(mode="after")
    def _enough_calibration(self) -> RunConfig:
        """The IRT fit needs a number of fully evaluated candidates: known now, before any work,
        and said in the key's own units."""
        if self.fitness.full_evaluation:  # no IRT model to fit
            return self
        dims = self.fitness.dims or len(self.tasks)
        needed = minimum_calibration(dims)
        given = 1 + len(self.sources.experts) + len(DEFAULT_MERGES)  # seeds and default merges
        if given + self.fitness.calibration < needed:
            raise ValueError(
                f"fitness.calibration: {self.fitness.calibration} is too few. A {dims}-dimensional "
                f"IRT model ({'fitness.dims' if self.fitness.dims else 'one per task'}) needs "
                f"{needed} fully evaluated candidates; the base, the experts and the default "
                f"merges give {given}, so set fitness.calibration to at least {needed - given} "
                f"(or lower fitness.dims)")
        return self

    @property
    def uses_ray(self) -> bool:
        return self.backend == "ray" or (self.backend is None and self.workers > 1)

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _byte_size(cls, value):
        return parse_bytes(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_budget(self) -> RunConfig:
        if self.evaluations is not None and "generations" in self.model_fields_set:
            raise ValueError("give generations or evaluations, not both")
        return self

    def generation_sizes(self) -> list[int]:
        """Children per generation: `population` each, or the evaluation budget split so."""
        if self.evaluations is None:
            return [self.population] * self.generations
        full, rest = divmod(self.evaluations, self.population)
        return [self.population] * full + ([rest] if rest else [])

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, value: dict[str, str]) -> dict[str, str]:
        known = {"accuracy", "params", "bytes", "nonzero"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; known: {sorted(known)}")
        return value


# Keys added after runs were saved, with the value that reproduces those runs: a run's own
# config.yaml lists every key it was started with, so one missing there predates the key.
BEFORE_THE_KEY = {("fitness", "bank_items_per_task"): None}  # no bank: the whole split


def load_config(path: Path, overrides: dict | None = None,
                ray_overrides: dict | None = None, saved_run: bool = False) -> RunConfig:
    """A validated RunConfig from YAML, with the CLI's overrides (None: keep the file's); every
    error names its key. `saved_run`: the file is a run's own config.yaml, in which a key added
    since the run began takes the value the run ran with (`BEFORE_THE_KEY`), not the default."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"cannot read the run config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the run config must be a mapping of keys to values")
    if saved_run:
        for (section, key), value in BEFORE_THE_KEY.items():
            if isinstance(data.get(section), dict):
                data[section].setdefault(key, value)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "generations" in overrides:  # a generations override replaces an evaluation budget
        data.pop("evaluations", None)
    data |= overrides
    ray_overrides = {k: v for k, v in (ray_overrides or {}).items() if v is not None}
    if ray_overrides:
        data["ray"] = (data.get("ray") or {}) | ray_overrides
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = ".".join(str(p) for p in item["loc"]) or "(top level)"
            problems.append(f"{key}: {item['msg']}")
        raise ConfigError(f"{path}: invalid run config:\n  " + "\n  ".join(problems)) from None
