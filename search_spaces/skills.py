"""The zoo's synthetic skills: small, exactly checkable problems a character-level LM can learn.

Each skill draws a problem from a seeded `random.Random` and returns it as an evaluation item
(prompt + answer, or prompt + choices); the training text of an item is its prompt followed by
its answer. Prompts start with the skill's name, so a merged model can tell the skills apart.

A skill has a size knob (`longest`: word length, or digits). The zoo's base model is pre-trained
on short problems only; an expert learns its skill over the full range. That is the shape of real
fine-tuning (the base has the circuits, the expert extends them), and it keeps task vectors small
enough to merge.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from fitness.items import ChoiceItem, GenerationItem

LETTERS = "abcdefgh"
BRACKETS = "()"
Draw = Callable[[random.Random, int], GenerationItem | ChoiceItem]


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    draw: Draw  # (rng, longest) -> item
    format: str  # "generation" or "choice"
    longest: int  # the full range, seen by the expert and the evaluation
    shortest_seen: int  # the range pre-training sees

    def item(self, rng: random.Random) -> GenerationItem | ChoiceItem:
        return self.draw(rng, self.longest)

    def pretraining_item(self, rng: random.Random) -> GenerationItem | ChoiceItem:
        return self.draw(rng, self.shortest_seen)


def _word(rng: random.Random, alphabet: str, shortest: int, longest: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(shortest, longest)))


def _reverse(rng: random.Random, longest: int) -> GenerationItem:
    word = _word(rng, LETTERS, 2, longest)
    return GenerationItem(f"rev:{word}=", word[::-1], max_new_tokens=longest + 1)


def _sort(rng: random.Random, longest: int) -> GenerationItem:
    word = _word(rng, LETTERS, 2, longest)
    return GenerationItem(f"sort:{word}=", "".join(sorted(word)), max_new_tokens=longest + 1)


def _shift(rng: random.Random, longest: int) -> GenerationItem:
    word = _word(rng, LETTERS, 2, longest)
    shifted = "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in word)
    return GenerationItem(f"inc:{word}=", shifted, max_new_tokens=longest + 1)


def _count(rng: random.Random, longest: int) -> GenerationItem:
    word = _word(rng, "ab", 2, longest)
    return GenerationItem(f"cnt:{word}=", str(word.count("a")), max_new_tokens=2)


SKILLS: dict[str, Skill] = {skill.name: skill for skill in (
    Skill("rev", "reverse a word: rev:abcd= -> dcba", _reverse, "generation", 7, 4),
    Skill("sort", "sort a word's letters: sort:dbca= -> abcd", _sort, "generation", 7, 4),
    Skill("inc", "shift each letter by one: inc:abh= -> bca", _shift, "generation", 7, 4),
    Skill("cnt", "count the a's: cnt:abaab= -> 3", _count, "generation", 9, 5),
)}


def training_text(item: GenerationItem | ChoiceItem) -> tuple[str, str]:
    """(prompt, answer) text of an item, as the model should see it in training."""
    if isinstance(item, ChoiceItem):
        return item.prompt, item.choices[item.answer]
    return item.prompt, item.answer


def copy_item(rng: random.Random) -> GenerationItem:
    """The pre-training staple every expert builds on: copy a string of the zoo's symbols."""
    word = _word(rng, LETTERS + "0123456789" + BRACKETS, 2, 8)
    return GenerationItem(f"cpy:{word}=", word, max_new_tokens=9)
