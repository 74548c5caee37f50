"""A word-level tokenizer for the LSTM, trained on the task's own texts with the `tokenizers` library.

The result is a `PreTrainedTokenizerFast` (a `tokenizer.json` on disk), so it saves with `save_pretrained`, loads with
`AutoTokenizer.from_pretrained`, and works with `DataCollatorWithPadding` and pipelines. `[PAD]` is id 0 (the LSTM
config's default `pad_token_id`) and `[UNK]` id 1; words are ids 2.. in order of frequency.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN)  # order fixes the ids: [PAD] = 0, [UNK] = 1


def build_word_normalizer() -> normalizers.Normalizer:
    """HTML line breaks (`<br />`, `<br/>`, `<br>`) to spaces, then NFD + strip accents + lowercase ("Café" -> "cafe")."""
    return normalizers.Sequence(
        [
            normalizers.Replace(Regex(r"(?i)<br\s*/?>"), " "),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
        ]
    )


def train_word_tokenizer(texts: Iterable[str], vocab_size: int = 20000, min_frequency: int = 2, model_max_length: int = 256):
    """Train a word-level tokenizer on `texts` and wrap it as a `PreTrainedTokenizerFast`.

    Args:
        texts: the training texts (a list, a generator, or a `datasets` column such as `dataset["text"]`); read once.
        vocab_size: the most tokens, the 2 special tokens included; the vocabulary is smaller if fewer words reach
            `min_frequency`. Give the model `len(tokenizer)` as its vocab_size.
        min_frequency: words seen fewer times than this become `[UNK]`.
        model_max_length: the default truncation length (`truncation=True` without `max_length`).

    Words and punctuation runs are separate tokens (`\\w+|[^\\w\\s]+`); text is lowercased, accents stripped and `<br />`
    replaced by a space first. Padding and truncation act on the right, as the LSTM (reading left to right) needs.
    """
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of strings, not one string; wrap a single text in a list.")
    minimums = {"vocab_size": len(SPECIAL_TOKENS) + 1, "min_frequency": 1, "model_max_length": 1}
    values = {"vocab_size": vocab_size, "min_frequency": min_frequency, "model_max_length": model_max_length}
    for name, minimum in minimums.items():
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}.")
        if value < minimum:
            detail = f" ({len(SPECIAL_TOKENS)} special tokens {list(SPECIAL_TOKENS)} plus one word)" if name == "vocab_size" else ""
            raise ValueError(f"{name} = {value} is too small; it must be at least {minimum}{detail}.")

    text_iterator = iter(texts)
    first = next(text_iterator, None)
    if first is None:
        raise ValueError("texts is empty; the tokenizer needs training text.")

    backend = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    backend.normalizer = build_word_normalizer()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = _join_words_decoder()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    backend.train_from_iterator(_batches(itertools.chain([first], text_iterator)), trainer=trainer)
    if backend.token_to_id(PAD_TOKEN) != 0 or backend.token_to_id(UNK_TOKEN) != 1:
        raise RuntimeError(f"Special tokens got ids {backend.token_to_id(PAD_TOKEN)}, {backend.token_to_id(UNK_TOKEN)}; expected 0 and 1.")

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )


def _join_words_decoder() -> decoders.Decoder:
    # WordLevel has no decoder of its own; WordPiece with an unused prefix joins tokens with spaces and tidies
    # the space before punctuation ("great !" -> "great!").
    return decoders.WordPiece(prefix="##", cleanup=True)


def _batches(texts: Iterator[str], batch_size: int = 1000) -> Iterator[list[str]]:
    # Batches let the Rust trainer work on many texts per call into Python.
    while batch := list(itertools.islice(texts, batch_size)):
        for text in batch:
            if not isinstance(text, str):
                raise TypeError(f"texts must hold strings, got {type(text).__name__}: {text!r:.80}")
        yield batch
