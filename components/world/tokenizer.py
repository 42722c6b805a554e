"""A real SD-compatible CLIP tokenizer built offline from the BPE merges that ship with open_clip.

The vocabulary is laid out the way the original CLIP tokenizer lays it out: the 256 byte-unicode
symbols, the same symbols with ``</w>`` (end of word), one entry per merge (the merged pair joined),
then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). Ids therefore equal open_clip's.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

N_MERGES = 49152 - 256 - 2  # merges used by CLIP: vocab 49408 = 2 * 256 bytes + merges + 2 specials
MAX_LENGTH = 77


def bpe_path() -> Path:
    """Path of open_clip's ``bpe_simple_vocab_16e6.txt.gz``."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed; it carries the CLIP BPE vocabulary")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def byte_symbols() -> list[str]:
    """The 256 printable unicode symbols that stand for bytes 0..255, in CLIP's vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + extra
            extra += 1
    return [chr(codes[b]) for b in printable] + [
        chr(codes[b]) for b in range(256) if b not in printable
    ]


@lru_cache(maxsize=1)
def read_merges() -> tuple[str, ...]:
    """The merge lines ("a b") used by CLIP, without the header line."""
    with gzip.open(bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    return tuple(lines[1 : N_MERGES + 1])


def build_vocab() -> dict[str, int]:
    """Token -> id, 49,408 entries."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in read_merges()]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer(max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` whose ids equal open_clip's; pads to ``max_length`` tokens.

    77 is Stable Diffusion's context; a world whose captions are short can use fewer (the pipeline
    pads and truncates to the tokenizer's ``model_max_length``).
    """
    return CLIPTokenizer(
        vocab=build_vocab(),
        merges=[tuple(m.split()) for m in read_merges()],
        model_max_length=max_length,
    )
