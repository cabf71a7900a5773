"""A small Vision Transformer for distillation experiments on small images (digits, CIFAR).

Architecture: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale" (ICLR 2021), following the official ``google-research/vision_transformer`` (``vit_jax/models_vit.py``):

* patch embedding: a ``patch_size x patch_size`` convolution with stride ``patch_size`` (no padding) to
  ``hidden`` channels, flattened to ``N = (H / p) * (W / p)`` tokens;
* a learnable class token (zero init) prepended, learnable position embeddings ``[1, N + 1, hidden]``
  (``N(0, 0.02)``) added, then dropout;
* ``depth`` pre-LN encoder blocks ``x + MHSA(LN(x))``, ``x + MLP(LN(x))`` with ``MLP = Dense(mlp_dim)``,
  GELU, dropout, ``Dense(hidden)``, dropout; attention is softmax(``q kᵀ / sqrt(d_head)``) over ``heads``
  heads, computed in float32 whatever the compute dtype;
* a final LayerNorm and a linear classifier on the class token (zero-initialised, as in the official code).

Dense layers use Xavier-uniform weights and zero biases, LayerNorm ``epsilon = 1e-6`` (the official
values). The position embeddings fix the number of patches: a model initialised on 32x32 images refuses
16x16 ones (a ``ValueError`` names both token counts) instead of silently broadcasting.

Features sown (flat names on the top module): ``embed`` (the ``[B, N + 1, D]`` tokens entering the first
block: class token + patches + position embeddings), ``block1`` … ``block{depth}`` (the ``[B, N + 1, D]``
tokens after each block; token 0 is the class token), ``block1_attention`` … (each block's ``[B, heads,
N + 1, N + 1]`` attention weights, rows summing to 1, in the compute dtype), ``tokens`` (the last block's
tokens after the final LayerNorm) and ``pooled`` (the ``[B, D]`` class-token embedding fed to the
classifier, ``tokens[:, 0]``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.checks import check_int, check_number
from jaxkd.models.base import check_image_input, classifier_logits

_dense_init = nn.initializers.xavier_uniform()
_LN_EPS = 1e-6


class SelfAttention(nn.Module):
    """Multi-head self-attention that also returns its softmax weights."""

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """``(output [B, T, D], weights [B, heads, T, T])``."""
        hidden = x.shape[-1]
        head_dim = hidden // self.heads

        def project(name):
            return nn.DenseGeneral(
                (self.heads, head_dim), kernel_init=_dense_init, dtype=self.dtype, name=name
            )(x)

        q, k, v = project("query"), project("key"), project("value")  # [B, T, heads, head_dim]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores / jnp.sqrt(jnp.float32(head_dim)), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = nn.DenseGeneral(
            hidden, axis=(-2, -1), kernel_init=_dense_init, dtype=self.dtype, name="out"
        )(out)
        return out, weights


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``."""

    heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """``(tokens after the block, attention weights)``."""
        y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="ln1")(x)
        y, weights = SelfAttention(self.heads, dtype=self.dtype, name="attention")(y)
        x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="ln2")(x)
        y = nn.Dense(self.mlp_dim, kernel_init=_dense_init, dtype=self.dtype, name="mlp_in")(y)
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.gelu(y, approximate=False))
        y = nn.Dense(x.shape[-1], kernel_init=_dense_init, dtype=self.dtype, name="mlp_out")(y)
        x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        return x, weights


class ViT(nn.Module):
    """Vision Transformer classifier (class-token head).

    Attributes:
      num_classes: classifier outputs.
      patch_size: side of the square patches; must divide the image height and width.
      hidden: token width ``D``.
      depth: number of encoder blocks.
      heads: attention heads; must divide ``hidden``.
      mlp_dim: width of each block's MLP.
      dropout_rate: dropout after the embeddings, the attention output and in the MLPs (needs a
        ``"dropout"`` rng when > 0 and training).
      dtype: compute dtype (parameters stay float32); logits are returned in float32.
    """

    num_classes: int
    patch_size: int = 4
    hidden: int = 192
    depth: int = 6
    heads: int = 3
    mlp_dim: int = 768
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """Logits ``[batch, num_classes]`` (float32) of normalized float images ``x`` ``[B, H, W, C]``."""
        check_image_input(self, x, first_layer="patch_embed")
        _, height, width, channels = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"ViT: patch_size={p} does not divide the image size {height}x{width} (input shape "
                f"{tuple(x.shape)}); pick a patch size that divides both sides"
            )
        x = nn.Conv(
            self.hidden, (p, p), strides=(p, p), padding="VALID", kernel_init=_dense_init,
            dtype=self.dtype, name="patch_embed",
        )(x)
        b = x.shape[0]
        x = x.reshape(b, -1, self.hidden)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.hidden), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.hidden)), x], axis=1)
        num_tokens = x.shape[1]
        if not self.is_initializing():  # applied to another image size than the one initialised with
            expected = self.variables["params"]["pos_embedding"].shape[1]
            if expected != num_tokens:
                raise ValueError(
                    f"ViT: the model was initialized for {expected - 1} patches (+1 class token), got "
                    f"{num_tokens - 1} patches from input shape {(b, height, width, channels)} at "
                    f"patch_size={p}; the position embeddings fix the image size"
                )
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (1, num_tokens, self.hidden), jnp.float32
        )
        x = x + pos.astype(x.dtype)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        self.sow("intermediates", "embed", x)
        for i in range(1, self.depth + 1):
            x, weights = EncoderBlock(
                self.heads, self.mlp_dim, self.dropout_rate, dtype=self.dtype, name=f"encoder_block{i}"
            )(x, train)
            self.sow("intermediates", f"block{i}", x)
            self.sow("intermediates", f"block{i}_attention", weights)
        x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="final_ln")(x)
        self.sow("intermediates", "tokens", x)
        return classifier_logits(self, x[:, 0], self.num_classes, name="head", kernel_init=nn.initializers.zeros)


#: ``vit_tiny``'s configuration (ViT-Ti width: DeiT's 192 wide, 3 heads, MLP ratio 4; 6 blocks), for
#: 32x32 images at patch 4 (64 patches); pass ``patch_size=2`` (16 patches) for 8x8 digits.
VIT_TINY = dict(patch_size=4, hidden=192, depth=6, heads=3, mlp_dim=768)


def vit(
    *,
    num_classes: int,
    dtype: Any = jnp.float32,
    patch_size: int = VIT_TINY["patch_size"],
    hidden: int = VIT_TINY["hidden"],
    depth: int = VIT_TINY["depth"],
    heads: int = VIT_TINY["heads"],
    mlp_dim: int = VIT_TINY["mlp_dim"],
    dropout_rate: float = 0.0,
) -> ViT:
    """A :class:`ViT`; the defaults are :data:`VIT_TINY`.

    Raises:
      ValueError: ``patch_size``, ``hidden``, ``depth``, ``heads`` or ``mlp_dim`` is not an integer
        ``>= 1``, ``heads`` does not divide ``hidden``, or ``dropout_rate`` is not in ``[0, 1)``.
        (A patch size that does not divide the image size is refused at init/apply, naming both.)
    """
    patch_size = check_int("patch_size", patch_size, low=1)
    hidden = check_int("hidden", hidden, low=1)
    depth = check_int("depth", depth, low=1)
    heads = check_int("heads", heads, low=1)
    mlp_dim = check_int("mlp_dim", mlp_dim, low=1)
    if hidden % heads:
        raise ValueError(f"heads must divide hidden, got hidden={hidden}, heads={heads}")
    check_number("dropout_rate", dropout_rate, low=0.0, high=1.0, high_open=True)
    return ViT(
        num_classes=num_classes, patch_size=patch_size, hidden=hidden, depth=depth, heads=heads,
        mlp_dim=mlp_dim, dropout_rate=dropout_rate, dtype=dtype,
    )
