"""lgvq_fast.compat.VectorQuantize beyond training numerics: argument and input checks, running without the peers
or triton, the codebook synchronised across processes like the peer's, bf16 inputs, and the near-tie rule the
comparisons rely on (tests/compat/test_compat_vq.py has the method)."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from lgvq_fast.compat import VectorQuantize

# tests/compat/ is on sys.path (pytest's default import mode puts the folder of a test module there)
from _compat_peer import _quiet  # noqa: F401  (an autouse fixture: it must be in this module)
from _compat_peer import B, DIM, K, N, Peer, _close, _inputs, _pair, _spread, _tied


def test_vector_quantize_rejects_bad_arguments():
    bad = [
        ({"dim": 0}, "dim"), ({"codebook_size": 2.5}, "codebook_size"), ({"heads": 0}, "heads"),
        ({"decay": 1.5}, "decay"), ({"eps": 0.0}, "eps"), ({"threshold_ema_dead_code": -1}, "threshold"),
        ({"use_cosine_sim": True, "learnable_codebook": True, "ema_update": False}, "use_cosine_sim"),
        ({"learnable_codebook": True}, "ema_update=False"),
        ({"straight_through": True}, "rotation_trick"),
        ({"directional_reparam": True}, "threshold_ema_dead_code"),
        ({"kmeans_init": True, "kmeans_iters": 0}, "kmeans_iters"),
        ({"affine_param": True}, "affine_param"), ({"impl": "gpu"}, "impl"), ({"precision": "half"}, "precision"),
        ({"accept_image_fmap": True, "accept_3d_fmap": True}, "accept_3d_fmap"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            VectorQuantize(**{"dim": DIM, "codebook_size": K, **kwargs})
    vq = VectorQuantize(DIM, K)
    x = torch.randn(B, N, DIM)
    calls = [
        (lambda: vq(x, topk=2), "topk"), (lambda: vq(x, codebook_transform_fn=lambda e: e), "codebook_transform_fn"),
        (lambda: vq(torch.randn(B, N, DIM - 1)), "dim=19"), (lambda: vq(torch.randn(B, 2, N, DIM)), "x must be"),
        (lambda: vq(x.long()), "floating-point"), (lambda: vq(x, mask=torch.ones(B, N - 1, dtype=torch.bool)), "mask"),
        (lambda: vq(x, lens=torch.tensor([3.0, 4.0])), "lens"),
        (lambda: vq(x, lens=torch.tensor([3, 4]), mask=torch.ones(B, N, dtype=torch.bool)), "not both"),
    ]
    for call, match in calls:
        with pytest.raises(ValueError, match=match):
            call()
    heads = VectorQuantize(DIM, K, codebook_dim=5, heads=2)
    with pytest.raises(ValueError, match="mask/lens cannot be used"):
        heads(x, lens=torch.tensor([3, 4]))


def test_compat_runs_without_the_peers_and_triton():
    # the peers, their helpers and triton blocked: both classes still import and run (reference search)
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        BLOCKED = ("vector_quantize_pytorch", "taming", "triton", "einops", "einx")
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is blocked for this test")
        sys.meta_path.insert(0, Blocker())
        for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
            del sys.modules[name]
        import torch
        from lgvq_fast.compat import VectorQuantize, VectorQuantizer2
        q, i, loss = VectorQuantize(6, 5, threshold_ema_dead_code=1)(torch.randn(2, 7, 6))
        assert q.shape == (2, 7, 6) and i.shape == (2, 7)
        q, loss, (_, _, i) = VectorQuantizer2(5, 6, 0.25)(torch.randn(2, 6, 3, 2))
        assert q.shape == (2, 6, 3, 2) and i.shape == (12,)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


def _ddp_worker(rank, world, port, out_dir):
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        warnings.simplefilter("ignore")
        # sync_codebook left at None: on, as in the peer, because several processes run
        kw = {"dim": DIM, "codebook_size": K, "kmeans_init": True, "kmeans_iters": 3, "threshold_ema_dead_code": 1.5}
        torch.manual_seed(0)
        peer = Peer(**kw)
        torch.manual_seed(0)
        ours = VectorQuantize(**kw)
        assert ours._codebook.use_ddp and peer._codebook.use_ddp
        centers = torch.randn(2 * K, DIM, generator=torch.Generator().manual_seed(7))
        data = torch.Generator().manual_seed(100 + rank)
        results = []
        for step in range(3):
            n = (30, 7, 19)[step] + 5 * rank
            x = centers[torch.randint(2 * K, (B, n), generator=data)] + 0.2 * torch.randn(B, n, DIM, generator=data)
            out = []
            for vq in (peer, ours):
                # the same draws on every rank (the multinomial split is drawn on rank 0 and broadcast)
                torch.manual_seed(500 + step)
                _, idx, loss = vq(x)
                out.append((idx, loss.detach(), {k: v.clone() for k, v in vq.state_dict().items()}))
            results.append(out)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_vector_quantize_sync_codebook_across_processes_like_the_peer(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    mp.spawn(_ddp_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for rank, results in enumerate(ranks):
        for step, ((ip, lp, sp), (io, lo, so)) in enumerate(results):
            assert torch.equal(io, ip), (rank, step)
            _close(lo, lp, f"loss rank {rank} step {step}")
            for key in sp:
                _close(so[key], sp[key], f"{key} rank {rank} step {step}")
                # the codebook is the same on every rank
                assert torch.equal(so[key], ranks[0][step][1][2][key]), (key, rank, step)


def test_vector_quantize_bf16_input_like_the_peer():
    # no projection: a bf16 input through the fp32 project_in fails in the peer too
    peer, ours = _pair(threshold_ema_dead_code=2)
    _spread(peer, ours)
    x = _inputs(peer).bfloat16()
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    qp, ip, lp = peer(xp)
    torch.manual_seed(1)
    qo, io, lo = ours(xo)
    assert qo.dtype == torch.bfloat16 and torch.equal(io, ip) and torch.equal(qo, qp)
    _close(lo.float(), lp.float(), "loss")
    (qp.float().sum() + lp).backward()
    (qo.float().sum() + lo).backward()
    _close(xo.grad.float(), xp.grad.float(), "input gradient", rtol=1e-2)
    for key, value in peer.state_dict().items():
        _close(ours.state_dict()[key], value, key)


def test_tie_check_accepts_only_near_ties():
    # the gate that lets an index differ from the peer's: a swap between codes within rounding passes,
    # a swap between distinct codes does not
    peer, ours = _pair()
    _spread(peer, ours)
    codes = ours._codebook.embed.detach().clone()
    codes[0, 1] = codes[0, 0] * (1 + 1e-7)
    x = _inputs(peer)
    x[0, :5] = codes[0, 0] + 0.01 * torch.randn(5, DIM)
    on_pair = (torch.arange(N) < 5)[None].expand(B, N) & (torch.arange(B) == 0)[:, None]
    theirs = torch.where(on_pair, 0, torch.randint(2, K, (B, N)))
    assert _tied(ours, x, torch.where(on_pair, 1, theirs), theirs, codes)
    assert not _tied(ours, x, torch.where(on_pair, 2, theirs), theirs, codes)
