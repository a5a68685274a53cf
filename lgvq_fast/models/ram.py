"""Relationship Alignment Module (spec §4): code projection + the fused ``relation_loss`` op.

The word features are the text encoder's token features of the UNMASKED caption (as the official code,
whose CLIP pass never sees the mask), whatever ``mask_input`` is.
"""
import torch.nn as nn
import torch.nn.functional as F


class CodeProjection(nn.Module):
    """Linear(embed_dim → C_text, weight N(0, 0.01²)) → GELU → LayerNorm(C_text)."""

    def __init__(self, embed_dim: int, c_text: int):
        super().__init__()
        self.fc = nn.Linear(embed_dim, c_text)
        nn.init.normal_(self.fc.weight, std=0.01)
        self.norm = nn.LayerNorm(c_text)

    def forward(self, codes):
        return self.norm(F.gelu(self.fc(codes)))


class RelationAlignment(nn.Module):
    def __init__(self, embed_dim: int, c_text: int):
        super().__init__()
        self.proj = CodeProjection(embed_dim, c_text)

    def forward(self, text_feats, vision_tokens, codes, pad_mask):
        """text_feats [B, L, C], vision_tokens [B, T, C] (f_vt outputs), codes [B, T, D] quantized → scalar."""
        from lgvq_fast.ops import relation_loss

        # the op takes each input in its own float dtype and computes in fp32
        return relation_loss(text_feats, vision_tokens, self.proj(codes), pad_mask)
