"""Forward/backward kernel pairs: linear, LoRA, activations, dropout and losses.

Every forward returns ``(out, cache)``; every backward takes ``(dout, cache)``
and returns fresh, C-contiguous arrays. A cache is a small frozen dataclass
holding what the backward pass needs: references to the caller's arrays (not
copies) and the small intermediates, never a new ``(out, in)``-sized array. Do
not modify the forward's inputs in place before calling the backward.

``x`` may have any number of leading batch dimensions ``(..., features)``; the
kernels flatten them to ``N = prod(batch dims)`` rows for the matrix products
(a reshape, so no copy for contiguous input) and restore them on the way out.
float32 in gives float32 out and float32 gradients. Parameters must share
``x``'s dtype; masks, targets and upstream gradients are cast to it.

Checked shell, unchecked core
    Each public kernel ``name`` checks its arguments once (with the helpers of
    :mod:`lowrank.nn.functional.checks`) and calls ``name_core``, which does
    the maths and nothing else: no validation, the caller guarantees shapes
    and dtypes. ``linear`` calls ``linear_core``, ``lora_linear_backward``
    calls ``lora_linear_backward_core``, ``gelu`` calls ``gelu_core``, and so
    on for every kernel and loss. The layers of :mod:`lowrank.nn` validate
    their input and ``dy`` once and call the cores.

The symbols are those of ``docs/lora.md``: ``x``, ``weight`` (``W``),
``bias`` (``b``), ``A``, ``B``, ``scaling``, ``mask``, ``xm = x * mask``,
``xa = xm @ A.T``, the upstream gradient ``dy``, and ``dxa``/``dxm`` for the
gradients with respect to ``xa``/``xm``.

Files: ``dense`` (linear and LoRA linear), ``dora`` (DoRA linear, ``docs/dora.md``),
``lora_variants`` (LoRA on an Embedding, loralib's merged qkv), ``activations``,
``regularization`` (dropout and its mask), ``losses``, ``checks`` (the
argument checks); ``conv1d`` (transformers' Conv1D), ``normalization`` (layer
norm), ``embedding`` and ``attention`` (softmax, scaled dot-product
attention), whose symbols are those of ``docs/attention.md``.
"""

from lowrank.nn.functional.activations import (
    GELUCache,
    ReLUCache,
    SigmoidCache,
    TanhCache,
    gelu,
    gelu_backward,
    gelu_backward_core,
    gelu_core,
    gelu_tanh,
    gelu_tanh_backward,
    gelu_tanh_backward_core,
    gelu_tanh_core,
    relu,
    relu_backward,
    relu_backward_core,
    relu_core,
    sigmoid,
    sigmoid_backward,
    sigmoid_backward_core,
    sigmoid_core,
    tanh,
    tanh_backward,
    tanh_backward_core,
    tanh_core,
)
from lowrank.nn.functional.attention import (
    AttentionCache,
    AttentionGrads,
    SoftmaxCache,
    causal_mask,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
    scaled_dot_product_attention_backward_core,
    scaled_dot_product_attention_core,
    softmax,
    softmax_backward,
    softmax_backward_core,
    softmax_core,
)
from lowrank.nn.functional.conv1d import (
    Conv1DCache,
    conv1d,
    conv1d_backward,
    conv1d_backward_core,
    conv1d_core,
)
from lowrank.nn.functional.dense import (
    LinearCache,
    LinearGrads,
    LoRACache,
    LoRAGrads,
    linear,
    linear_backward,
    linear_backward_core,
    linear_core,
    lora_linear,
    lora_linear_backward,
    lora_linear_backward_core,
    lora_linear_core,
)
from lowrank.nn.functional.dora import (
    DoRACache,
    DoRAGrads,
    dora_linear,
    dora_linear_backward,
    dora_linear_backward_core,
    dora_linear_core,
    weight_norm,
    weight_norm_core,
)
from lowrank.nn.functional.embedding import (
    EmbeddingCache,
    check_indices,
    embedding,
    embedding_backward,
    embedding_backward_core,
    embedding_core,
)
from lowrank.nn.functional.lora_variants import (
    LoRAEmbeddingCache,
    LoRAEmbeddingGrads,
    LoRAMergedCache,
    check_enable_lora,
    enabled_rows,
    lora_embedding,
    lora_embedding_backward,
    lora_embedding_backward_core,
    lora_embedding_core,
    lora_merged_linear,
    lora_merged_linear_backward,
    lora_merged_linear_backward_core,
    lora_merged_linear_core,
    merged_delta_core,
)
from lowrank.nn.functional.losses import (
    IGNORE_INDEX,
    binary_cross_entropy_with_logits,
    binary_cross_entropy_with_logits_core,
    cross_entropy,
    cross_entropy_core,
    mse_loss,
    mse_loss_core,
)
from lowrank.nn.functional.normalization import (
    LayerNormCache,
    LayerNormGrads,
    layer_norm,
    layer_norm_backward,
    layer_norm_backward_core,
    layer_norm_core,
)
from lowrank.nn.functional.regularization import (
    DropoutCache,
    dropout,
    dropout_backward,
    dropout_backward_core,
    dropout_core,
    dropout_mask,
)

__all__ = [
    "IGNORE_INDEX",
    "AttentionCache",
    "AttentionGrads",
    "Conv1DCache",
    "DoRACache",
    "DoRAGrads",
    "DropoutCache",
    "EmbeddingCache",
    "GELUCache",
    "LayerNormCache",
    "LayerNormGrads",
    "LinearCache",
    "LinearGrads",
    "LoRACache",
    "LoRAEmbeddingCache",
    "LoRAEmbeddingGrads",
    "LoRAGrads",
    "LoRAMergedCache",
    "ReLUCache",
    "SigmoidCache",
    "SoftmaxCache",
    "TanhCache",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_core",
    "causal_mask",
    "check_enable_lora",
    "check_indices",
    "conv1d",
    "conv1d_backward",
    "conv1d_backward_core",
    "conv1d_core",
    "cross_entropy",
    "cross_entropy_core",
    "dora_linear",
    "dora_linear_backward",
    "dora_linear_backward_core",
    "dora_linear_core",
    "dropout",
    "dropout_backward",
    "dropout_backward_core",
    "dropout_core",
    "dropout_mask",
    "embedding",
    "embedding_backward",
    "embedding_backward_core",
    "embedding_core",
    "enabled_rows",
    "gelu",
    "gelu_backward",
    "gelu_backward_core",
    "gelu_core",
    "gelu_tanh",
    "gelu_tanh_backward",
    "gelu_tanh_backward_core",
    "gelu_tanh_core",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_backward_core",
    "layer_norm_core",
    "linear",
    "linear_backward",
    "linear_backward_core",
    "linear_core",
    "lora_embedding",
    "lora_embedding_backward",
    "lora_embedding_backward_core",
    "lora_embedding_core",
    "lora_linear",
    "lora_linear_backward",
    "lora_linear_backward_core",
    "lora_linear_core",
    "lora_merged_linear",
    "lora_merged_linear_backward",
    "lora_merged_linear_backward_core",
    "lora_merged_linear_core",
    "merged_delta_core",
    "mse_loss",
    "mse_loss_core",
    "relu",
    "relu_backward",
    "relu_backward_core",
    "relu_core",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "scaled_dot_product_attention_backward_core",
    "scaled_dot_product_attention_core",
    "sigmoid",
    "sigmoid_backward",
    "sigmoid_backward_core",
    "sigmoid_core",
    "softmax",
    "softmax_backward",
    "softmax_backward_core",
    "softmax_core",
    "tanh",
    "tanh_backward",
    "tanh_backward_core",
    "tanh_core",
    "weight_norm",
    "weight_norm_core",
]
