"""Codebook sync of VectorQuantizer and CVQVectorQuantizer across 2 gloo processes on CPU."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lgvq_fast import VectorQuantizer
from lgvq_fast.quantize_cvq import CVQVectorQuantizer

D, K, WORLD, STEPS = 11, 29, 2, 4
THRESHOLD = 0.95
INIT_SEED = 1234


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_vq(threshold):
    torch.manual_seed(INIT_SEED)
    return VectorQuantizer(D, K, ema_update=True, decay=0.9, threshold_ema_dead_code=threshold).train()


def _make_cvq():
    torch.manual_seed(INIT_SEED)
    cvq = CVQVectorQuantizer(D, K).train()
    with torch.no_grad():
        cvq.embed.normal_()
    return cvq


def _worker(rank, port, data, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        result = {}
        for threshold in (0.0, THRESHOLD):
            vq = _make_vq(threshold)
            # each rank draws different random numbers: only the sync can keep the codebooks equal
            torch.manual_seed(100 + rank)
            restarted = 0
            for step in range(STEPS):
                vq(data[step][rank])
                restarted += int((vq.cluster_size == THRESHOLD).sum()) if threshold else 0
            result[f"vq{threshold}"] = {k: v.clone() for k, v in vq.state_dict().items()}
            result[f"restarted{threshold}"] = restarted
        cvq = _make_cvq()
        torch.manual_seed(200 + rank)
        for step in range(STEPS):
            _, _, loss = cvq(data[step][rank])
            loss.backward()
            if step == 0:
                result["cvq_prob_step0"] = cvq.embed_prob.clone()
        result["cvq"] = {k: v.clone() for k, v in cvq.state_dict().items()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _data():
    sizes = [(23, 31), (0, 17), (40, 9), (12, 12)]
    return [[torch.randn(n, D) for n in step] for step in sizes]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    data = _data()
    mp.spawn(_worker, args=(_free_port(), data, out_dir), nprocs=WORLD, join=True)
    results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    return data, results


@pytest.mark.parametrize("key", ["vq0.0", f"vq{THRESHOLD}", "cvq"], ids=["ema", "ema-dead-code", "cvq"])
def test_quantizer_codebooks_bitwise_identical_across_ranks(ddp_results, key):
    _, results = ddp_results
    a, b = results[0][key], results[1][key]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.isfinite(a["embed"]).all()


def test_dead_code_restart_happened_under_ddp(ddp_results):
    _, results = ddp_results
    assert results[0][f"restarted{THRESHOLD}"] > 0


def test_vector_quantizer_ddp_ema_equals_single_process_on_union(ddp_results):
    data, results = ddp_results
    vq = _make_vq(0.0)
    for step in data:
        vq(torch.cat(step))
    ddp = results[0]["vq0.0"]
    for name, t in vq.state_dict().items():
        torch.testing.assert_close(ddp[name], t, rtol=1e-5, atol=1e-6, msg=name)


def test_cvq_ddp_usage_equals_single_process_on_union(ddp_results):
    data, results = ddp_results
    cvq = _make_cvq()
    cvq(torch.cat(data[0]))
    torch.testing.assert_close(results[0]["cvq_prob_step0"], cvq.embed_prob, rtol=1e-6, atol=1e-9)
