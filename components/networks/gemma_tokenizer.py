"""An offline Gemma tokenizer: a small byte-pair vocabulary trained with ``tokenizers`` on a
prompt corpus, loaded into transformers' own ``GemmaTokenizer`` (what ``SanaPipeline`` loads as
``tokenizer``), so the tokenizer's normalizer, pre-tokenizer, byte fallback and special tokens are
Gemma's and only the vocabulary is small.

The released Gemma-2 vocabulary (256,000 pieces) is a sentencepiece model that no registry here
ships; the tiny tier trains its own instead, on its prompts and on the instruction text
``SanaPipeline`` puts before every prompt by default (``complex_human_instruction``), so that the
instruction tokenizes into a few hundred pieces rather than thousands of characters. Gemma's
conventions: ``<pad>`` id 0, ``<eos>`` 1, ``<bos>`` 2 (put before every sequence), ``<unk>`` 3,
``<mask>`` 4, a space written as "▁" and split before, 256 byte-fallback pieces ``<0x00>`` …
``<0xFF>`` for characters outside the vocabulary. Real teachers load the released tokenizer
with ``from_pretrained`` as usual.
"""

from __future__ import annotations

from collections.abc import Iterable

from components.networks.t5_tokenizer import DEFAULT_CORPUS

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
BYTES = tuple(f"<0x{b:02X}>" for b in range(256))


def build_gemma_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 1024,
                          max_length: int = 300):
    """A ``GemmaTokenizer`` whose byte-pair vocabulary (``vocab_size`` at most, plus the byte
    pieces) is trained on ``corpus`` and SANA's default instruction; ``max_length`` is its
    ``model_max_length``."""
    from diffusers import SanaPipeline
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import GemmaTokenizer

    from components.networks.sana import default_instruction

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    trainer = BpeTrainer(vocab_size=vocab_size + len(SPECIALS) + len(BYTES),
                         special_tokens=[*SPECIALS, *BYTES], show_progress=False)
    tok.train_from_iterator([*corpus, "\n".join(default_instruction(SanaPipeline))], trainer)
    return GemmaTokenizer(vocab=tok.get_vocab(), merges=_merges(tok), model_max_length=max_length,
                          add_bos_token=True, add_eos_token=False)


def _merges(tok) -> list[tuple[str, str]]:
    """The trained model's merges in order (from its serialised form)."""
    import json

    return [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
            for m in json.loads(tok.to_str())["model"]["merges"]]
