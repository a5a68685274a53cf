"""``VectorQuantize``: vector-quantize-pytorch's class (release 1.32) on lgvq_fast's fused ops.

Same constructor arguments and defaults, forward arguments and return values, parameter and buffer
names and shapes (``_codebook.embed``, ``_codebook.embed_avg``, ``_codebook.cluster_size``,
``_codebook.initted``, ``project_in.*``, ``project_out.*``), so ``ours.load_state_dict(peer.state_dict())``
keeps a codebook trained with the peer, and the same seed builds the same initial weights.
What differs is documented on the class; the codebook's own notes are in ``_vq_codebook``.
"""
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from lgvq_fast.compat import _vq_math as vm
from lgvq_fast.compat._vq_codebook import Codebook
from lgvq_fast.compat._vq_config import (
    check_input,
    check_unsupported,
    resolve_arguments,
)

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])
# how forward's input was laid out, to lay the outputs out the same way
_Layout = namedtuple("_Layout", ["only_one", "spatial", "need_transpose", "batch", "dtype"])


def _sequential(*modules):
    modules = [m for m in modules if m is not None]
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


class VectorQuantize(nn.Module):
    """vector-quantize-pytorch's ``VectorQuantize`` whose search is ``ops.nearest_code`` and whose EMA
    update is ``ops.ema_update_``.

    Arguments are the peer's (see its README); two keyword-only extras choose how our ops run:
    ``precision`` (``"exact"``/``"fast"``, see ``ops.nearest_code``) and ``impl``
    (``"auto"``/``"reference"``/``"triton"``/``"cuda"``).

    Agreement with the peer: with the same state the indices are equal except on near-ties (two codes
    within fp32 rounding of each other, where the two distance formulas may pick different ones), and
    outputs, losses, gradients and the updated codebook agree to rounding.

    Peer behaviours kept on purpose (a model trained with the peer trains the same way here):
    - in training, ``quantize = x + (code - x).detach()`` (or the rotation trick, on by default for
      ``dim > 1``); its value is the code up to rounding. In eval mode it is the code, with no gradient;
    - with ``mask``/``lens`` the commitment loss compares the codes with the input as given
      (``orig_input``), not with the l2-normalised or projected input the codes are compared with
      elsewhere; under ``use_cosine_sim`` the peer's masked loss is therefore not a cosine loss.
      Where the shapes cannot be compared at all (``codebook_dim``/``heads`` with a mask: the peer raises
      a shape error) this class raises ValueError;
    - with ``indices=`` the forward returns ``(quantize, ce_loss)`` with ``quantize`` still in the
      internal (split-head, projected) layout;
    - ``get_codes_from_indices`` with several heads sharing one codebook returns ``[..., heads, d]``
      (not merged), so ``get_output_from_indices`` only works with ``separate_codebook_per_head``.

    Peer failures made to work: ``get_output_from_indices`` for channel-first outputs (``channel_last=False``,
    feature maps) with a projection applies ``project_out`` on the feature dim (the peer applies it to the
    last spatial dim and fails); ``lens`` with ``channel_last=False`` measures the sequence dim.

    Not supported (ValueError naming the argument): ``topk``, ``codebook_transform_fn``, ``affine_param``.
    ``sync_codebook`` (default: on when ``torch.distributed`` runs with several processes) all-reduces the
    EMA statistics inside ``ops.ema_update_`` and draws k-means seeds and restarts as the peer does.
    """

    def __init__(
        self, dim, codebook_size, codebook_dim=None, heads=1, separate_codebook_per_head=False, decay=0.8,
        eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10, sync_kmeans=True,
        use_cosine_sim=False, layernorm_after_project_in=False, threshold_ema_dead_code=0, channel_last=True,
        accept_image_fmap=False, accept_3d_fmap=False, commitment_weight=1.0,
        commitment_use_cross_entropy_loss=False, orthogonal_reg_weight=0.0, orthogonal_reg_active_codes_only=False,
        orthogonal_reg_max_codes=None, codebook_diversity_loss_weight=0.0, codebook_diversity_temperature=100.0,
        stochastic_sample_codes=False, sample_codebook_temp=1.0, straight_through=False, rotation_trick=None,
        directional_reparam=False, directional_reparam_variance=5e-3, sync_codebook=None, sync_affine_param=False,
        ema_update=None, vq_bridge=None, manual_ema_update=False, learnable_codebook=None,
        in_place_codebook_optimizer=None, manual_in_place_optimizer_update=False, affine_param=False,
        affine_param_batch_decay=0.99, affine_param_codebook_decay=0.9, sync_update_v=0.0,
        return_zeros_for_masked_padding=True, route_gradients_to_input=True, *, precision="exact", impl="auto",
    ):
        super().__init__()
        a = resolve_arguments(locals())
        # built in the peer's order (project_in, project_out, codebook) so a seed gives the same weights
        self._init_projections(a)
        self._init_loss_settings(a)
        self._codebook = self._build_codebook(a)
        optimizer = a["in_place_codebook_optimizer"]
        self.in_place_codebook_optimizer = optimizer(self._codebook.parameters()) if optimizer is not None else None
        self.manual_in_place_optimizer_update = a["manual_in_place_optimizer_update"]
        self.codebook_size = a["codebook_size"]
        self.accept_image_fmap = a["accept_image_fmap"]
        self.accept_3d_fmap = a["accept_3d_fmap"]
        self.channel_last = a["channel_last"]
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        self.return_zeros_for_masked_padding = a["return_zeros_for_masked_padding"]
        self.freeze_codebook = a["freeze_codebook"]

    def _init_projections(self, a):
        """``project_in``/``project_out`` between ``dim`` and ``codebook_dim * heads`` (identities when equal)."""
        dim = a["dim"]
        self.dim = dim
        self.heads = a["heads"]
        self.separate_codebook_per_head = a["separate_codebook_per_head"]
        codebook_input_dim = a["codebook_dim"] * a["heads"]
        requires_projection = codebook_input_dim != dim
        self.project_in = _sequential(
            nn.Linear(dim, codebook_input_dim),
            nn.LayerNorm(codebook_input_dim) if a["layernorm_after_project_in"] else None,
        ) if requires_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_input_dim, dim) if requires_projection else nn.Identity()
        self.has_projections = requires_projection

    def _init_loss_settings(self, a):
        """The loss weights and the gradient-routing choices, as the peer names them."""
        self.eps = a["eps"]
        self.has_commitment_loss = a["commitment_weight"] > 0.0 and not a["directional_reparam"]
        for key in ("commitment_weight", "commitment_use_cross_entropy_loss", "learnable_codebook"):
            setattr(self, key, a[key])
        self.has_codebook_orthogonal_loss = a["orthogonal_reg_weight"] > 0.0
        for key in ("orthogonal_reg_weight", "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes"):
            setattr(self, key, a[key])
        self.has_codebook_diversity_loss = a["codebook_diversity_loss_weight"] > 0.0
        for key in ("codebook_diversity_temperature", "codebook_diversity_loss_weight", "rotation_trick",
                    "directional_reparam", "directional_reparam_variance", "route_gradients_to_input",
                    "sync_update_v", "use_cosine_sim"):
            setattr(self, key, a[key])

    def _build_codebook(self, a):
        return Codebook(
            dim=a["codebook_dim"], codebook_size=a["codebook_size"],
            num_codebooks=a["heads"] if a["separate_codebook_per_head"] else 1,
            kmeans_init=a["kmeans_init"], kmeans_iters=a["kmeans_iters"], sync_kmeans=a["sync_kmeans"],
            decay=a["decay"], eps=a["eps"], threshold_ema_dead_code=a["threshold_ema_dead_code"],
            use_ddp=a["sync_codebook"], learnable_codebook=self.has_codebook_orthogonal_loss or a["learnable_codebook"],
            sample_codebook_temp=a["sample_codebook_temp"], stochastic_sample_codes=a["stochastic_sample_codes"],
            straight_through=a["straight_through"], ema_update=a["ema_update"],
            manual_ema_update=a["manual_ema_update"], use_cosine_sim=a["use_cosine_sim"], vq_bridge=a["vq_bridge"],
            precision=a["precision"], impl=a["impl"],
        )

    @property
    def ema_update(self):
        return self._codebook.ema_update

    @property
    def codebook(self):
        """The codes: ``[K, codebook_dim]``, or ``[heads, K, codebook_dim]`` with ``separate_codebook_per_head``."""
        codebook = self._codebook.embed
        return codebook if self.separate_codebook_per_head else codebook[0]

    @codebook.setter
    def codebook(self, codes):
        if not self.separate_codebook_per_head:
            codes = codes[None]
        with torch.no_grad():
            self._codebook.embed.copy_(codes)

    def get_codes_from_indices(self, indices):
        codes = self._codes(indices)
        return codes.movedim(-1, 1) if self._channel_first_output else codes

    @property
    def _channel_first_output(self):
        return not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap

    def _codes(self, indices):
        codebook = self.codebook
        if codebook.ndim == 2:
            codes = codebook[indices]
        else:
            lead = indices.shape[1:-1]
            flat = indices.reshape(indices.shape[0], -1, indices.shape[-1]).transpose(1, 2)  # [b, h, n]
            codes = torch.stack([codebook[h][flat[:, h]] for h in range(codebook.shape[0])], dim=1)  # [b, h, n, d]
            codes = codes.permute(0, 2, 1, 3).reshape(indices.shape[0], *lead, -1)
        return codes

    def get_output_from_indices(self, indices):
        """``project_out`` of the codes, in the forward's output layout (what eval mode returns)."""
        # projected on the feature (last) dim before the channel moves: the peer projects after the move,
        # which fails for channel-first outputs with codebook_dim or heads
        out = self.project_out(self._codes(indices))
        return out.movedim(-1, 1) if self._channel_first_output else out

    def update_in_place_optimizer(self):
        if self.in_place_codebook_optimizer is None:
            return
        if self._codebook.use_ddp:
            dist = torch.distributed
            for param in self._codebook.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= dist.get_world_size()
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    def maybe_split_heads_from_input(self, x):
        return vm.split_heads(x, self.heads, self.separate_codebook_per_head)

    def expire_codes_(self, x):
        x = self._codebook.transform_input(x)
        x = self.maybe_split_heads_from_input(x)
        self._codebook.expire_codes_(x)

    def _codebook_input(self, x):
        x = self.project_in(x)
        x = self.maybe_split_heads_from_input(x)
        return self._codebook.transform_input(x)

    def update_indices(self, x, indices, mask=None):
        """EMA update (and dead-code restart) of the codebook from given ``indices`` (the peer's ``update_indices``)."""
        if (self.accept_image_fmap or self.accept_3d_fmap) and mask is not None:
            raise ValueError("VectorQuantize.update_indices: mask cannot be combined with a feature-map input")
        x, spatial = vm.to_tokens(x, self.accept_image_fmap, self.accept_3d_fmap)
        if spatial is None and not self.channel_last:
            x = x.transpose(1, 2)
        x = self._codebook_input(x)
        if spatial is not None:
            indices = indices.reshape(indices.shape[0], -1, *indices.shape[1 + len(spatial):])
        if self.heads > 1:
            # [b, n, h] -> [h, b, n] (separate codebooks) or [1, b*h, n] (shared), as the input was split
            indices = indices.permute(2, 0, 1) if self.separate_codebook_per_head else \
                indices.permute(0, 2, 1).reshape(1, -1, indices.shape[1])
        if x.ndim == 2:
            indices = indices[:, None]
        self._codebook.update_indices(x, indices, mask=mask)

    update_ema_indices = update_indices

    def forward(self, x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
                freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
                ema_update_weight=None, accum_ema_update=False, ema_update=None):
        check_unsupported(topk=topk, codebook_transform_fn=codebook_transform_fn)
        check_input(self, x, mask, lens)
        input_requires_grad = x.requires_grad
        freeze_codebook = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        if lens is not None:
            # the sequence length (the peer takes x.shape[1], the feature size for channel_last=False, and fails)
            mask = vm.lens_to_mask(lens, x.shape[1] if self.channel_last else x.shape[-1])
        x, orig_input, layout = self._to_codebook_layout(x)
        need_dist = indices is not None or (self.training and (
            (self.has_commitment_loss and self.commitment_use_cross_entropy_loss) or self.has_codebook_diversity_loss))
        kwargs = {"sample_codebook_temp": sample_codebook_temp, "mask": mask, "freeze_codebook": freeze_codebook,
                  "ema_update_weight": ema_update_weight, "accum_ema_update": accum_ema_update,
                  "ema_update": ema_update, "need_dist": need_dist}
        quantize, embed_ind, distances = self._codebook(x, **kwargs)
        quantize = quantize.type(layout.dtype)
        inplace_optimize_loss = self.zero
        if self.in_place_codebook_optimizer is not None and self.training and not freeze_codebook:
            inplace_optimize_loss = self._in_place_step(quantize, x, mask)
            quantize, embed_ind, distances = self._codebook(x, update_usage=False, **kwargs)
        commit_quantize = None
        if self.training:
            keep_graph = self.learnable_codebook and not freeze_codebook
            commit_quantize = quantize if keep_graph else quantize.detach()
            quantize = self._route_gradients(x, quantize, input_requires_grad)
        if indices is not None:
            return quantize, vm.cross_entropy_on_distances(distances, indices, self.heads,
                                                           self.separate_codebook_per_head, layout.batch)
        embed_ind = self._indices_to_output_layout(embed_ind, layout)
        loss, commit_loss, codebook_diversity_loss, orthogonal_reg_loss = self._training_losses(
            commit_quantize, x, orig_input, mask, distances, embed_ind, layout.batch)
        quantize = self._quantize_to_output_layout(quantize, layout)
        if mask is not None:
            quantize, embed_ind = self._fill_masked(quantize, embed_ind, orig_input, mask)
        quantize = self._restore_input_layout(quantize, layout)
        if not return_loss_breakdown:
            return quantize, embed_ind, loss
        return quantize, embed_ind, loss, LossBreakdown(commit_loss, codebook_diversity_loss, orthogonal_reg_loss,
                                                        inplace_optimize_loss)

    def _to_codebook_layout(self, x):
        """``x`` as the codebook takes it (tokens, projected, split into heads), the input the masked
        commitment loss compares with (``orig_input``, channel-last), and the layout to restore."""
        orig_input = x
        only_one = x.ndim == 2
        if only_one:
            x = x[:, None, :]
        batch, dtype = x.shape[0], x.dtype
        x, spatial = vm.to_tokens(x, self.accept_image_fmap, self.accept_3d_fmap)
        need_transpose = not self.channel_last and spatial is None and not only_one
        if need_transpose:
            x = x.transpose(1, 2)
            orig_input = orig_input.transpose(1, 2)
        layout = _Layout(only_one=only_one, spatial=spatial, need_transpose=need_transpose, batch=batch, dtype=dtype)
        return self._codebook_input(x), orig_input, layout

    def _route_gradients(self, x, quantize, input_requires_grad):
        """Training: the input's gradient through the codes (rotation trick, directional reparam or
        straight-through), then the vqtorch ``sync_update_v`` term."""
        if input_requires_grad and self.route_gradients_to_input:
            if self.rotation_trick:
                quantize = vm.rotate_to(x, quantize)
            elif self.directional_reparam:
                quantize = vm.directional_reparam(x, quantize, self.directional_reparam_variance)
            else:
                quantize = vm.straight_through(x, quantize)
        if self.sync_update_v > 0.0:
            # update rule (21) of the vqtorch draft
            quantize = quantize + self.sync_update_v * (quantize - quantize.detach())
        return quantize

    def _indices_to_output_layout(self, embed_ind, layout):
        if self.heads > 1:
            embed_ind = vm.merge_heads(embed_ind, self.heads, self.separate_codebook_per_head, layout.batch)
        if layout.spatial is not None:
            embed_ind = vm.from_tokens(embed_ind, layout.spatial, channel=False)
        if layout.only_one:
            embed_ind = embed_ind[:, 0]
        return embed_ind

    def _training_losses(self, commit_quantize, x, orig_input, mask, distances, embed_ind, batch):
        """``(loss, commitment, codebook_diversity, orthogonal_reg)``: all ``self.zero`` outside training."""
        loss = commit_loss = codebook_diversity_loss = orthogonal_reg_loss = self.zero
        if self.training:
            loss.requires_grad_()
            if self.has_codebook_diversity_loss:
                codebook_diversity_loss = vm.neg_entropy_of_mean(distances, self.codebook_diversity_temperature)
                loss = loss + codebook_diversity_loss * self.codebook_diversity_loss_weight
            if self.has_commitment_loss:
                commit_loss = self._commitment(commit_quantize, x, orig_input, mask, distances, embed_ind, batch)
                loss = loss + commit_loss * self.commitment_weight
            if self.has_codebook_orthogonal_loss:
                orthogonal_reg_loss = self._orthogonal(embed_ind, x.device)
                loss = loss + orthogonal_reg_loss * self.orthogonal_reg_weight
        return loss, commit_loss, codebook_diversity_loss, orthogonal_reg_loss

    def _quantize_to_output_layout(self, quantize, layout):
        """Heads merged and ``project_out`` applied: ``[b, n, dim]`` tokens."""
        if self.heads > 1:
            quantize = vm.merge_heads(quantize, self.heads, self.separate_codebook_per_head, layout.batch)
            quantize = quantize.reshape(*quantize.shape[:2], -1)
        return self.project_out(quantize)

    def _fill_masked(self, quantize, embed_ind, orig_input, mask):
        """Padding positions: zeros (or the input) in ``quantize``, ``-1`` in the indices."""
        fill = torch.zeros_like(orig_input) if self.return_zeros_for_masked_padding else orig_input
        quantize = torch.where(mask[..., None], quantize, fill)
        ind_mask = mask.reshape(*mask.shape, *([1] * (embed_ind.ndim - 2)))
        return quantize, torch.where(ind_mask, embed_ind, -1)

    @staticmethod
    def _restore_input_layout(quantize, layout):
        """Tokens back to the input's layout (channel-first, feature map, or one vector per row)."""
        if layout.need_transpose:
            quantize = quantize.transpose(1, 2)
        if layout.spatial is not None:
            quantize = vm.from_tokens(quantize, layout.spatial, channel=True)
        if layout.only_one:
            quantize = quantize[:, 0]
        return quantize

    def _in_place_step(self, quantize, x, mask):
        if mask is not None:
            loss = F.mse_loss(quantize, x.detach(), reduction="none")
            loss_mask = vm.head_rows_mask(mask, loss.shape[0], loss.shape[1]) if self.heads > 1 else mask
            loss = loss[loss_mask].mean()
        else:
            loss = F.mse_loss(quantize, x.detach())
        loss.backward()
        if not self.manual_in_place_optimizer_update:
            self.update_in_place_optimizer()
        return loss

    def _commitment(self, commit_quantize, x, orig_input, mask, distances, embed_ind, batch):
        if self.commitment_use_cross_entropy_loss:
            if mask is not None:
                ce_mask = mask[..., None].expand(*mask.shape, self.heads) if self.heads > 1 else mask
                embed_ind.masked_fill_(~ce_mask, -1)
            return vm.cross_entropy_on_distances(distances, embed_ind, self.heads, self.separate_codebook_per_head,
                                                 batch)
        if mask is None:
            return F.mse_loss(commit_quantize, x)
        try:
            torch.broadcast_shapes(commit_quantize.shape, orig_input.shape)
        except RuntimeError:
            raise ValueError(
                "VectorQuantize: mask/lens cannot be used with codebook_dim or heads here: vector-quantize-pytorch "
                f"compares the codes {tuple(commit_quantize.shape)} with the unprojected input "
                f"{tuple(orig_input.shape)} and fails") from None
        loss = F.mse_loss(commit_quantize, orig_input, reduction="none")
        loss_mask = vm.head_rows_mask(mask, loss.shape[0], loss.shape[1]) if self.heads > 1 else mask
        return loss[loss_mask].mean()

    def _orthogonal(self, embed_ind, device):
        codebook = self._codebook.embed
        if self.orthogonal_reg_active_codes_only:
            codebook = codebook[:, torch.unique(embed_ind)]
        num_codes = codebook.shape[-2]
        if self.orthogonal_reg_max_codes is not None and num_codes > self.orthogonal_reg_max_codes:
            rand_ids = torch.randperm(num_codes, device=device)[:self.orthogonal_reg_max_codes]
            codebook = codebook[:, rand_ids]
        return vm.orthogonal_loss_fn(codebook)
