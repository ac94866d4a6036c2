"""Small random Qwen3, BERT and ModernBERT models with real tokenizers, built offline from a config.

Tests and benchmarks use them where a real checkpoint cannot be downloaded; they load through the
same AutoModel/AutoTokenizer path as Qwen3-Embedding and all-MiniLM.
"""

from __future__ import annotations

from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (BertConfig, BertModel, ModernBertConfig, ModernBertModel, PreTrainedTokenizerFast, Qwen3Config,
                          Qwen3Model)

from gaprune.checkpoint import write_sentence_transformers_files

CORPUS = [
    "Instruct: Given a chemistry question, retrieve the related context.\nQuery: ",
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: ",
    "What is the pKa of acetic acid and how does it change in a buffer?",
    "Sodium chloride dissolves in water because ion-dipole interactions outweigh the lattice energy.",
    "Nucleophilic substitution at a secondary carbon can follow SN1 or SN2 pathways.",
    "The capital of France is Paris, a city on the Seine river.",
    "How long should pasta boil before it is al dente?",
    "Gas chromatography separates volatile compounds by their boiling points and polarity.",
    "Transition metal complexes show colour from d-d electronic transitions.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Enzymes lower activation energy without changing the equilibrium constant.",
    "Football, tennis and basketball are popular sports around the world.",
]


def _corpus(extra: Iterable[str] = ()) -> list[str]:
    return CORPUS + list(extra)


def qwen3_tokenizer(extra_text: Iterable[str] = (), vocab_size: int = 400,
                    with_pad: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE that appends <|endoftext|> to every text, as Qwen3-Embedding's tokenizer does."""
    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(extra_text), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, tok.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos if with_pad else None,
                                   model_max_length=512)


def bert_tokenizer(extra_text: Iterable[str] = (), vocab_size: int = 400,
                   model_input_names: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Lower-casing WordPiece with [CLS] ... [SEP], like BERT's (``model_input_names``: what it returns,
    default input_ids, token_type_ids and attention_mask)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus(extra_text), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    names = {"model_input_names": model_input_names} if model_input_names else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512, **names)


def build_qwen3(folder: str, hidden_size: int = 64, intermediate_size: int = 128, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
                extra_text: Iterable[str] = (), with_pad: bool = True, vocab_size: int | None = None,
                head_dim: int | None = None, tokenizer_vocab: int = 400, device: str = "cpu") -> str:
    """A random Qwen3 embedding model (GQA, q/k norms) saved with its tokenizer and a lasttoken pooling config.

    ``vocab_size`` larger than the tokenizer's gives the embedding matrix a real model's size (Qwen3: 151669);
    ``head_dim`` defaults to hidden_size / num_heads (Qwen3-Embedding uses 128 at every size). The weights
    are drawn on ``device`` directly in ``dtype``.
    """
    torch.manual_seed(seed)
    tokenizer = qwen3_tokenizer(extra_text, vocab_size=tokenizer_vocab, with_pad=with_pad)
    config = Qwen3Config(vocab_size=max(vocab_size or 0, len(tokenizer)), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=head_dim or hidden_size // num_heads, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3Model(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_sentence_transformers_files(folder, hidden_size, "lasttoken")
    return folder


def build_bert(folder: str, hidden_size: int = 32, intermediate_size: int = 64, num_layers: int = 2,
               num_heads: int = 4, seed: int = 0, extra_text: Iterable[str] = (), pooling: str = "mean") -> str:
    """A random BERT encoder saved with its tokenizer and a sentence-transformers pooling config."""
    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(extra_text)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_sentence_transformers_files(folder, hidden_size, pooling)
    return folder


def build_modernbert(folder: str, hidden_size: int = 32, intermediate_size: int = 64, num_layers: int = 2,
                     num_heads: int = 4, seed: int = 0, extra_text: Iterable[str] = (), pooling: str = "mean",
                     global_attn_every_n_layers: int = 1) -> str:
    """A random ModernBERT encoder (fused attn.Wqkv, GLU mlp.Wi) saved with a WordPiece tokenizer and a
    sentence-transformers pooling config. Every layer attends globally unless ``global_attn_every_n_layers``
    says otherwise (ModernBERT-base: 3, the others attend to a sliding window)."""
    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(extra_text, model_input_names=["input_ids", "attention_mask"])
    specials = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
                "cls_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
                "sep_token_id": tokenizer.sep_token_id}
    config = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                              num_hidden_layers=num_layers, num_attention_heads=num_heads,
                              max_position_embeddings=512, global_attn_every_n_layers=global_attn_every_n_layers,
                              local_attention=16, **specials)
    ModernBertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_sentence_transformers_files(folder, hidden_size, pooling)
    return folder


# The published Qwen3-Embedding shapes (config.json of each hub model), for building random stand-ins
# and counting parameters without a download.
QWEN3_EMBEDDING_SHAPES: dict[str, dict[str, int]] = {
    "Qwen3-Embedding-0.6B": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                             "vocab_size": 151669},
    "Qwen3-Embedding-4B": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151665},
    "Qwen3-Embedding-8B": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151665},
}


def qwen3_parameter_count(shape: dict[str, int], intermediate_size: int | None = None,
                          num_attention_heads: int | None = None) -> int:
    """Parameters of a Qwen3Model of ``shape`` (optionally with fewer MLP channels or query heads), counted on
    the meta device, so no memory is allocated."""
    config = Qwen3Config(**{**shape, **({"intermediate_size": intermediate_size} if intermediate_size else {}),
                            **({"num_attention_heads": num_attention_heads} if num_attention_heads else {})})
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen3Model(config).parameters())
