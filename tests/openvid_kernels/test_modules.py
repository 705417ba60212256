"""The nn.Module building blocks against plain attention written out in the test (fp64, reference backend;
the ops themselves are checked against their references in the other files)."""

import pytest
import torch

import openvid_kernels as ok


def plain_attention(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(D)) v over [N, Sq, H, D] / [N, Sk, H, D]; key_mask [N, Sk] True = real."""
    scores = torch.einsum("nqhd,nkhd->nhqk", q, k) * q.shape[-1] ** -0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None], float("-inf"))
    return torch.einsum("nhqk,nkhd->nqhd", scores.softmax(-1), v)


@pytest.fixture(autouse=True)
def reference_backend():
    with ok.use_backend("reference"):
        yield


@pytest.mark.parametrize("over", ["spatial", "temporal"])
def test_self_attention_attends_within_or_across_frames(over):
    torch.manual_seed(0)
    B, T, S, C, H = 2, 3, 5, 32, 4
    attn = ok.SelfAttention(C, H, over=over).double()
    x = torch.randn(B, T * S, C, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(B, T, S, 3, H, C // H).unbind(3)
    if over == "spatial":  # sequences: the S tokens of each frame
        out = plain_attention(*(t.flatten(0, 1) for t in (q, k, v))).reshape(B, T * S, C)
    else:  # sequences: the T frames at each position
        out = plain_attention(*(t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)))
        out = out.reshape(B, S, T, C).transpose(1, 2).reshape(B, T * S, C)
    torch.testing.assert_close(attn(x, num_frames=T), attn.proj(out))


def test_cross_attention_reads_only_the_real_caption_tokens():
    torch.manual_seed(1)
    B, N, L, C, H = 2, 7, 6, 32, 2
    cross = ok.CrossAttention(C, H).double()
    x, y = torch.randn(B, N, C, dtype=torch.float64), torch.randn(B, L, C, dtype=torch.float64)
    lens = torch.tensor([2, 6])
    q = cross.q_linear(x).view(B, N, H, -1)
    k, v = cross.kv_linear(y).view(B, L, 2, H, -1).unbind(2)
    expected = cross.proj(plain_attention(q, k, v, torch.arange(L) < lens[:, None]).flatten(-2))
    torch.testing.assert_close(cross(x, y, lens), expected)
    garbage = y.clone()
    garbage[0, 2:] = 1e3  # padded tokens of the first caption: never read
    torch.testing.assert_close(cross(x, garbage, lens), expected)


def test_adaln_single_adds_the_table_to_the_shared_projection():
    table = ok.AdaLNSingle(8, num_vectors=3)
    t = torch.randn(2, 24)
    shift, scale, gate = table(t)
    assert shift.shape == (2, 1, 8)
    torch.testing.assert_close(gate[:, 0], table.scale_shift_table[2] + t[:, 16:])
    with pytest.raises(ValueError, match=r"table must be \[n, C\] and t \[B, n\*C\]"):
        ok.modulation(table.scale_shift_table, torch.randn(2, 23))


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="hidden_size 30 is not a multiple of num_heads 4"):
        ok.SelfAttention(30, 4)
    with pytest.raises(ValueError, match="over must be 'spatial' or 'temporal'"):
        ok.SelfAttention(32, 4, over="joint")
    with pytest.raises(ValueError, match="hidden_size 30 is not a multiple of num_heads 4"):
        ok.CrossAttention(30, 4)
