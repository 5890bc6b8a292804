"""torch.compile(fullgraph=True) traces modules using the ops without graph breaks (reference backend, CPU)."""

import torch
import torch.nn.functional as F

from mome.ops import attention, itc_loss, modality_ffn, modality_layer_norm


class TinyMoMEBlock(torch.nn.Module):
    def __init__(self, dim=16, heads=2, experts=3):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.norm_weight = torch.nn.Parameter(torch.ones(experts, dim))
        self.w1 = torch.nn.Parameter(torch.randn(experts, 2 * dim, dim) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(experts, dim, 2 * dim) * 0.1)

    def forward(self, x, modality, padding):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + attention(q, k, v, key_padding_mask=padding).transpose(1, 2).reshape(batch, tokens, dim)
        flat, ids = x.reshape(-1, dim), modality.reshape(-1)
        hidden = modality_layer_norm(flat, ids, self.norm_weight, None)
        return x + modality_ffn(hidden, ids, self.w1, None, self.w2, None).view(batch, tokens, dim)


def test_block_compiles_without_graph_breaks_and_matches_eager():
    torch.manual_seed(0)
    block = TinyMoMEBlock()
    x = torch.randn(2, 7, 16)
    modality = torch.tensor([[0, 0, 0, 1, 1, 2, 2]] * 2)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -2:] = True
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, modality, padding)
    torch.testing.assert_close(out, block(x, modality, padding))
    out.sum().backward()
    assert block.w1.grad is not None and torch.isfinite(block.w1.grad).all()


def test_itc_loss_compiles_without_graph_breaks():
    image = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)

    def loss_fn(image, text, scale):
        return itc_loss(image, text, scale, hard_negatives="hardest")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    result = compiled(image, text, scale)
    expected = loss_fn(image, text, scale)
    torch.testing.assert_close(result.loss, expected.loss)
    assert torch.equal(result.neg_text_idx, expected.neg_text_idx)
    result.loss.backward()
    assert scale.grad is not None
