"""An offline T5 tokenizer: a small unigram vocabulary trained with ``tokenizers`` on a prompt
corpus, wrapped as transformers' ``T5TokenizerFast`` (what FLUX and SD3 pipelines load as
``tokenizer_2`` / ``tokenizer_3``).

The released T5-XXL vocabulary is a sentencepiece model that no registry here ships; the tiny
tier and the miniature world train their own on their prompts instead (T5's conventions: ``<pad>``
id 0, ``</s>`` id 1 appended to every sequence, ``<unk>`` id 2, NFKC + lower-case, the
sentencepiece "▁" word marker). Real teachers load the released tokenizer with
``from_pretrained`` as usual.
"""

from __future__ import annotations

from collections.abc import Iterable

# Words of the tiny tier's prompts, so that a corpus-free build still has a real vocabulary.
DEFAULT_CORPUS = (
    "a red circle", "a blue square", "a green triangle on the left", "a yellow circle",
    "two purple stars at the top", "an orange square on the right of a white circle",
    "a small black triangle", "a large pink circle at the bottom", "three grey squares",
)


def build_t5_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 256,
                       max_length: int = 32):
    """A ``T5TokenizerFast`` trained on ``corpus`` (``vocab_size`` at most; ``max_length``
    tokens per sequence, its ``model_max_length``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                             unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=max_length,
                           pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
