"""``VectorQuantizer2``: taming-transformers' quantizer (``taming.modules.vqvae.quantize``) on ``ops.nearest_code``.

Same arguments, the ``embedding.weight`` key (so taming and LG-VQ checkpoints load), the same forward
results ``(z_q, loss, (perplexity, min_encodings, min_encoding_indices))`` and ``get_codebook_entry``.
Everything after the search is taming's own arithmetic, so with the same indices every output and
gradient is bit for bit taming's. The search differs in rounding only: taming takes the argmin of
``|z|^2 + |e|^2 - 2 z.e``, ``nearest_code`` that of ``|e|^2 - 2 z.e``; on a near-tie (two codes within
fp32 rounding of each other) the two may pick different codes.

Kept from taming on purpose: ``legacy=True`` (the default) weights the codebook term by ``beta`` and the
commitment term by 1, the reverse of the paper; ``z_q = z + (z_q - z).detach()``, whose value is the
code up to rounding; ``perplexity`` and ``min_encodings`` are None.
"""
import torch
from torch import nn

from lgvq_fast import ops
from lgvq_fast._backend import IMPLS

NAME = "VectorQuantizer2"


class VectorQuantizer2(nn.Module):
    """taming-transformers' ``VectorQuantizer2`` (see the module docstring). ``z`` is ``[b, e_dim, h, w]``.

    ``precision`` and ``impl`` (keyword-only, lgvq_fast's) choose how ``ops.nearest_code`` runs.
    """

    def __init__(self, n_e, e_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True,
                 *, precision="exact", impl="auto"):
        super().__init__()
        for key, v in (("n_e", n_e), ("e_dim", e_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{NAME}: {key} must be a positive int, got {v!r}")
        if precision not in ("exact", "fast"):
            raise ValueError(f"{NAME}: precision must be 'exact' or 'fast', got {precision!r}")
        if impl not in IMPLS:
            raise ValueError(f"{NAME}: impl must be one of {IMPLS}, got {impl!r}")
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.precision = precision
        self.impl = impl
        # built as taming builds it, so the same seed gives the same codebook
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
        self.remap = remap
        if self.remap is not None:
            import numpy as np

            self.register_buffer("used", torch.tensor(np.load(self.remap)))
            self.re_embed = self.used.shape[0]
            self.unknown_index = unknown_index
            if self.unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed = self.re_embed + 1
            print(f"Remapping {self.n_e} indices to {self.re_embed} indices. "
                  f"Using {self.unknown_index} for unknown indices.")
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds):
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, ...]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape).to(device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds):
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > self.used.shape[0]:
            # the extra "unknown" index maps to code 0
            inds[inds >= self.used.shape[0]] = 0
        back = torch.gather(used[None, :][inds.shape[0] * [0], :], 1, inds)
        return back.reshape(ishape)

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        if not (temp is None or temp == 1.0) or rescale_logits or return_logits:
            raise ValueError(f"{NAME}: temp, rescale_logits and return_logits exist only for interface "
                             "compatibility with the Gumbel quantizer; leave them at their defaults")
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != self.e_dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{NAME}: z must be [b, e_dim={self.e_dim}, h, w], got {got}")
        z = z.permute(0, 2, 3, 1).contiguous()
        z_flattened = z.view(-1, self.e_dim)
        weight = self.embedding.weight
        min_encoding_indices, _ = ops.nearest_code(z_flattened.detach(), weight.detach(), "l2", self.precision,
                                                   self.impl)
        z_q = self.embedding(min_encoding_indices).view(z.shape)
        if not self.legacy:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.remap is not None:
            min_encoding_indices = min_encoding_indices.reshape(z.shape[0], -1)
            min_encoding_indices = self.remap_to_used(min_encoding_indices)
            min_encoding_indices = min_encoding_indices.reshape(-1, 1)
        if self.sane_index_shape:
            min_encoding_indices = min_encoding_indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, min_encoding_indices)

    def get_codebook_entry(self, indices, shape):
        """Codes for ``indices``; with ``shape = (b, h, w, e_dim)`` returned as ``[b, e_dim, h, w]``."""
        if self.remap is not None:
            indices = indices.reshape(shape[0], -1)
            indices = self.unmap_to_all(indices)
            indices = indices.reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape)
            z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return z_q
