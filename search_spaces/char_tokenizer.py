"""The character-level tokenizer of the built-in models, saved as a real fast tokenizer.

One token per character, so the synthetic skills (digits, letters, brackets) are learnable by
models with a few hundred thousand parameters, and `AutoTokenizer` loads it like any other.
"""

from __future__ import annotations

from pathlib import Path

CHARSET = list("0123456789abcdefghijklmnopqrstuvwxyz +-=()[]<>.,:;?!\n")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIAL) + len(CHARSET)


def char_tokenizer():
    """A `PreTrainedTokenizerFast` that splits text into single characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + CHARSET)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def encode(text: str) -> list[int]:
    """Token ids of `text` without special tokens; the same ids the saved tokenizer gives."""
    try:
        return [_INDEX[char] for char in text]
    except KeyError as error:
        raise ValueError(f"character {error.args[0]!r} is not in the built-in charset") from None


_INDEX = {char: index for index, char in enumerate(SPECIAL + CHARSET)}


def save_char_tokenizer(folder: Path) -> None:
    char_tokenizer().save_pretrained(folder)
