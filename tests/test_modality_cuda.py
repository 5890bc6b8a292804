"""GPU tests of the modality family's CUDA backend (the routing kernel in mome._C) against a stable sort and its
Triton twin.

Every test is ``@pytest.mark.gpu``: without a CUDA device they are skipped (tests/conftest.py), and they also
skip, saying why, when the extension is not built. benchmarks/gpu_check.sh builds the extension first.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import poison, triton_module_or_none

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_extension")]


# ---- modality routing -------------------------------------------------------------------------------


def _routing_expected(modality, num_experts):
    perm = torch.sort(modality, stable=True).indices
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    counts = torch.bincount(modality, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return perm.int(), inv_perm.int(), offsets.int()


def _layout(kind, tokens, num_experts, generator):
    if kind == "random":
        return torch.randint(0, num_experts, (tokens,), device="cuda", generator=generator)
    if kind == "one_expert":  # every other expert empty
        return torch.full((tokens,), num_experts - 1, device="cuda")
    if kind == "split":  # image tokens first, then text (VLMo layout), expert 1 of 3 empty
        return torch.cat([torch.zeros(tokens // 3), torch.full((tokens - tokens // 3,), num_experts - 1)]).cuda()
    if kind == "interleaved":
        return torch.arange(tokens, device="cuda") % num_experts
    raise ValueError(kind)


@pytest.mark.parametrize("tokens", [1, 31, 1000, 16384, 16385, 100_003])  # both the one-block and tiled paths
@pytest.mark.parametrize("num_experts", [1, 3, 8, 256])
@pytest.mark.parametrize("kind", ["random", "one_expert", "split", "interleaved"])
def test_routing_matches_stable_sort(tokens, num_experts, kind):
    from mome.cuda import modality as routing

    generator = torch.Generator("cuda").manual_seed(tokens + num_experts)
    modality = _layout(kind, tokens, num_experts, generator).long()
    perm, inv_perm, offsets = (
        poison(torch.empty(n, dtype=torch.int32, device="cuda")) for n in (tokens, tokens, num_experts + 1)
    )
    routing.launch(perm, inv_perm, offsets, modality, num_experts)
    expected = _routing_expected(modality, num_experts)
    for name, got, want in zip(("perm", "inv_perm", "offsets"), (perm, inv_perm, offsets), expected, strict=True):
        mismatch = (got != want).nonzero()
        assert mismatch.numel() == 0, f"{name}: {mismatch.numel()} wrong, first at {mismatch[0].item()}"


def test_routing_empty_and_matches_triton():
    from mome.cuda.modality import modality_routing

    perm, inv_perm, offsets = modality_routing(torch.empty(0, dtype=torch.int64, device="cuda"), 4)
    assert perm.numel() == 0 and inv_perm.numel() == 0 and offsets.tolist() == [0] * 5
    generator = torch.Generator("cuda").manual_seed(1)
    modality = torch.randint(0, 3, (50_000,), device="cuda", generator=generator)
    ours = modality_routing(modality, 3)
    twin_module = triton_module_or_none("mome.kernels.modality_routing")
    if twin_module is not None:
        for got, want in zip(ours, twin_module.modality_routing(modality, 3), strict=True):
            assert torch.equal(got, want)
    compiled = torch.compile(lambda m: torch.ops.mome.modality_routing(m, 3, "cuda"), fullgraph=True)
    for got, want in zip(compiled(modality), ours, strict=True):
        assert torch.equal(got, want)


def test_a_linear_on_cuda_tensors_routes_with_the_cuda_kernel():
    from mome.ops import modality_linear
    from mome.ops.modality import ROUTING_BACKENDS, _routing_backend

    modality = torch.randint(0, 3, (300,), device="cuda")
    assert _routing_backend("triton", dict(modality=modality, num_experts=3)) == "cuda"
    assert ROUTING_BACKENDS.choose("auto", dict(modality=modality, num_experts=3))[0] == "cuda"
    if triton_module_or_none("mome.kernels.modality") is None:
        return
    x = torch.randn(300, 64, device="cuda")
    weight = torch.randn(3, 32, 64, device="cuda") * 0.1
    out = modality_linear(x, modality, weight, activation="gelu", backend="triton")
    expected = modality_linear(x.cpu().double(), modality.cpu(), weight.cpu().double(), activation="gelu")
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-4, atol=1e-4)
