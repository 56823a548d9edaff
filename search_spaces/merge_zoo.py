"""The built-in merge zoo: a tiny Llama base and skill experts, trained from code and cached.

The base is pre-trained on a synthetic corpus (copying strings, plus every skill on short
problems); each expert is fine-tuned from it on one skill over the full range, with half of each
batch replaying the pre-training mix (as real instruction tuning mixes in general data, and so
that an expert's change stays specific to its skill's prompt). The result is the landscape model
merging is for: the base is weak on long problems, each expert is strong on its own skill only,
and merges land in between.

Everything is seeded. The same recipe gives the same bytes on the same platform (CPU type and
thread count: the build pins torch to `BUILD_THREADS` threads). The zoo lives under
`<cache>/zoo/<hash of the recipe and the code version>/`, written to a temporary folder and
renamed into place, so an interrupted build never leaves a half-written zoo behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fitness.items import Task
from operators.cache import cache_dir
from search_spaces.char_tokenizer import (
    BOS_ID,
    CHARSET,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    save_char_tokenizer,
)
from search_spaces.lm_training import Problem, train
from search_spaces.skills import SKILLS, copy_item, training_text

ZOO_VERSION = 1  # bump when the build code changes what it produces
BUILD_THREADS = 2
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that determines the zoo's bytes; its hash names the cache folder."""

    skills: tuple[str, ...] = ("rev", "sort", "inc", "cnt")
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    context: int = 32
    batch_size: int = 64
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    skill_share: float = 0.5  # fraction of pre-training problems that are (short) skill problems
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    replay: float = 0.5  # fraction of each fine-tuning batch drawn from the pre-training mix
    items_per_split: int = 400
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.skills if s not in SKILLS]
        if unknown:
            raise ValueError(f"unknown zoo skills {unknown}; known: {sorted(SKILLS)}")

    def key(self) -> str:
        payload = {**asdict(self), "charset": CHARSET, "version": ZOO_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.heads, max_position_embeddings=self.context,
            tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
            eos_token_id=EOS_ID)


DEFAULT_RECIPE = ZooRecipe()


@dataclass(frozen=True)
class Zoo:
    recipe: ZooRecipe
    folder: Path

    @property
    def base(self) -> Path:
        return self.folder / "base"

    @property
    def experts(self) -> dict[str, Path]:
        return {skill: self.folder / skill for skill in self.recipe.skills}

    @property
    def models(self) -> dict[str, Path]:
        return {"base": self.base, **self.experts}


def zoo_folder(recipe: ZooRecipe = DEFAULT_RECIPE, root: Path | None = None) -> Path:
    return (root or cache_dir() / "zoo") / recipe.key()


def is_built(recipe: ZooRecipe = DEFAULT_RECIPE, root: Path | None = None) -> bool:
    return (zoo_folder(recipe, root) / "zoo.json").is_file()


def build_zoo(recipe: ZooRecipe = DEFAULT_RECIPE, root: Path | None = None,
              progress: Progress | None = None) -> Zoo:
    """The zoo of `recipe`, built (a few minutes on 2 cores) unless it is already cached."""
    folder = zoo_folder(recipe, root)
    if (folder / "zoo.json").is_file():
        return Zoo(recipe, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        _train_zoo(recipe, staging, progress or (lambda stage, done, total: None))
        (staging / "zoo.json").write_text(json.dumps(asdict(recipe) | {"key": recipe.key()},
                                                     indent=2))
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same build first
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    return Zoo(recipe, folder)


def _pretraining_problem(recipe: ZooRecipe) -> Callable[[random.Random], Problem]:
    skills = [SKILLS[name] for name in recipe.skills]

    def draw(rng: random.Random) -> Problem:
        if rng.random() < recipe.skill_share:
            return training_text(rng.choice(skills).pretraining_item(rng))
        return training_text(copy_item(rng))
    return draw


def _expert_problem(recipe: ZooRecipe, skill: str) -> Callable[[random.Random], Problem]:
    replay = _pretraining_problem(recipe)

    def draw(rng: random.Random) -> Problem:
        if rng.random() < recipe.replay:
            return replay(rng)
        return training_text(SKILLS[skill].item(rng))
    return draw


def _train_zoo(recipe: ZooRecipe, folder: Path, progress: Progress) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    base = LlamaForCausalLM(recipe.llama_config())
    train(base, _pretraining_problem(recipe), steps=recipe.pretrain_steps,
          batch_size=recipe.batch_size, learning_rate=recipe.pretrain_lr, seed=recipe.seed,
          loss_on_prompt=True, on_step=lambda step, loss: progress(
              "pre-training base", step, recipe.pretrain_steps))
    _save(base, folder / "base")
    for index, skill in enumerate(recipe.skills, start=1):
        expert = copy.deepcopy(base)
        train(expert, _expert_problem(recipe, skill), steps=recipe.finetune_steps,
              batch_size=recipe.batch_size, learning_rate=recipe.finetune_lr,
              seed=recipe.seed * 1000 + index, loss_on_prompt=False,
              on_step=lambda step, loss, skill=skill: progress(
                  f"fine-tuning {skill} expert", step, recipe.finetune_steps))
        _save(expert, folder / skill)


def _save(model, folder: Path) -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    model.save_pretrained(folder)
    save_char_tokenizer(folder)


def zoo_task(skill: str, recipe: ZooRecipe = DEFAULT_RECIPE) -> Task:
    """The task of a zoo skill: disjoint search and test splits of distinct, seeded items."""
    if skill not in recipe.skills:
        raise ValueError(f"unknown zoo task {skill!r}; the zoo's tasks: {list(recipe.skills)}")
    rng = random.Random(f"zoo-task/{skill}/{recipe.seed}")
    seen: set[str] = set()
    splits = []
    for _ in ("search", "test"):
        items = []
        for _attempt in range(100 * recipe.items_per_split):
            if len(items) == recipe.items_per_split:
                break
            item = SKILLS[skill].item(rng)
            if item.prompt not in seen:
                seen.add(item.prompt)
                items.append(item)
        splits.append(tuple(items))
    return Task(f"zoo/{skill}", SKILLS[skill].format, splits[0], splits[1],
                SKILLS[skill].description)
