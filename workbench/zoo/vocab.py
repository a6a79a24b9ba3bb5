"""Word vocabularies and word-level Hugging Face tokenizers for zoo models."""

from typing import Any

SPECIAL_TOKENS = ["<unk>", "<bos>", "<pad>"]

# Short, distinct English nouns: zoo prompts read as text.
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "piano",
    "candle",
    "forest",
    "mirror",
    "rocket",
    "garden",
    "bottle",
    "window",
    "castle",
    "pepper",
    "violin",
    "anchor",
    "basket",
    "camera",
    "dragon",
    "feather",
    "glacier",
    "harbor",
    "island",
    "jacket",
    "kettle",
    "lantern",
    "meadow",
    "needle",
    "orange",
    "pillow",
    "quartz",
    "ribbon",
    "saddle",
    "tunnel",
    "umbrella",
    "valley",
    "wagon",
    "yogurt",
    "zipper",
    "bridge",
    "carpet",
    "desert",
    "engine",
    "falcon",
    "ginger",
    "hammer",
    "igloo",
    "jungle",
    "ladder",
    "magnet",
    "nectar",
    "oyster",
    "parrot",
    "rabbit",
    "salmon",
    "tomato",
    "velvet",
    "walnut",
]


def build_word_tokenizer(words: list[str]) -> Any:
    """A word-level `PreTrainedTokenizerFast`: whitespace-split words, `<bos>` for prompts."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(words))}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=1024,
    )


def word_ids(tokenizer: Any) -> list[int]:
    """Ids of the ordinary (non-special) tokens of a tokenizer's vocabulary."""
    special = set(tokenizer.all_special_ids)
    return sorted(i for i in tokenizer.get_vocab().values() if i not in special)
