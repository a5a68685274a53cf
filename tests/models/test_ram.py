"""Relation alignment (lgvq_fast.models.ram) against the relation formula in float64."""
import torch
import torch.nn.functional as F

from lgvq_fast.models.ram import RelationAlignment


def test_ram_matches_relation_formula():
    ram = RelationAlignment(16, 24)
    b, length, t = 3, 9, 15
    text = torch.randn(b, length, 24)
    vis = torch.randn(b, t, 24)
    codes = torch.randn(b, t, 16)
    pad = torch.arange(length)[None, :] < torch.tensor([9, 5, 7])[:, None]
    got = ram(text, vis, codes, pad)
    q = ram.proj(codes).double()
    tn = F.normalize(text.double(), dim=-1)
    vn = F.normalize(vis.double(), dim=-1)
    a, p = (tn @ vn.transpose(1, 2)).max(-1)
    c = q[torch.arange(b)[:, None], p] * a[..., None]
    c = F.normalize(c, dim=-1) * pad[..., None]
    tp = tn * pad[..., None]
    ref = ((c @ c.transpose(1, 2) - tp @ tp.transpose(1, 2)) ** 2).mean()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
