"""The values the command-line flags accept, free of torch (so ``--help`` needs none of it).

The modules that act on a choice import its names from here; nothing else defines them.
"""

# --layer_types: the fine types of a transformer layer, then their groups (gaprune.layers turns them into
# parameter-name patterns per model family)
LAYER_TYPES = ("mlp_gate", "mlp_up", "mlp_down", "attn_q", "attn_k", "attn_v", "attn_o", "norm_input",
               "norm_post_attn", "norm_qk", "embed", "final_norm", "mlp", "attention", "layernorm", "linear", "all")
GRADIENTS = ("all", "selected")  # which parameters the scoring stages take gradients of

SUM_PLACES = ("device", "sharded", "cpu")  # beside the model, one rank each, in (pinned) host memory: least GPU last
ACCUMULATE_ON = ("auto", *SUM_PLACES)  # auto: the memory plan chooses
SCORE_DTYPES = ("float32", "bfloat16")  # the per-weight arrays of the score files
# gradient.py: the published element-wise product, or cosines of the two sides' gradients (gaprune.alignment_maps)
ALIGNMENT_MODES = ("product", "local_cosine", "row_cosine")

POSTPROCESSING = ("none", "zscore_sigmoid", "minmax", "rank")
FISHER_NORMS = ("global", "tensor", "none")

BUDGET_STRATEGIES = ("global", "uniform")
UNSTRUCTURED = "unstructured"  # no N:M pattern, no whole units: single weights
SPARSITY_PATTERNS = (UNSTRUCTURED, "2:4", "4:8")
UNIT_STRUCTURES = ("channels", "heads")  # whole MLP channels, whole query heads: the same count from every layer
LAYERS = "layers"  # whole transformer blocks (depth pruning)
STRUCTURES = (*UNIT_STRUCTURES, LAYERS)
# --block_scoring: the measurements of gaprune.blocks; a score-based weight scorer's name also works (its sum)
DEFAULT_SCORER = "dai"  # the published default of --unstructured_scoring
BLOCK_MEASURES = ("block_influence", "skip_drift", "skip_loss", "greedy_drift")
DISTILL_LOSSES = ("cosine", "mse")  # retrain.py --distill_loss: against the teacher's embeddings (gaprune.loss)

NATURAL_ORDER = "natural"  # N:M: SparseGPT's groups of M columns left to right
GROUP_ORDERS = (NATURAL_ORDER, "hessian")  # or by decreasing sum of H_jj (input energy)
UNIFORM_WEIGHTING = "uniform"  # every calibration token counts once (Wanda's and SparseGPT's statistics)
TOKEN_WEIGHTINGS = (UNIFORM_WEIGHTING, "loss_gradient")  # or by the loss's gradient at the layer's output
UNIFORM_SHARES = "uniform"  # --layer_shares: Wanda's and SparseGPT's own rule, the same share of every layer
OWN_TARGET = "own"  # --reconstruction_target: each layer's own outputs on the pruned model's inputs (SparseGPT)
RECONSTRUCTION_TARGETS = (OWN_TARGET, "dense")  # or the dense model's outputs (pruners.dense_target_weight)
