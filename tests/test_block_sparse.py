"""block_sparse_attn_func against the float64 reference with the layout's dense element mask applied.

The reference is attention_reference(..., attn_mask=layout.to_dense_elements()), so every check also
says that the kernels visit exactly the kept blocks and apply mask_mod exactly inside partial ones.
Same rule as the dense kernels (test_features._check): out, dq, dk, dv within 2x PyTorch's own error,
empty rows output 0 with lse +inf, keys nobody sees get dk = dv = 0.
"""

import random

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE, ON_GPU, assert_compiled_matches, candidate_indices, fresh_tuning, one_candidate_each
from test_features import BF16, FP16, FP32, _check, _padding_mask, _pick, _qkv

import hf_flash
from hf_flash import layouts as L
from hf_flash.layouts._blocks import _from_csr
import hf_flash.kernels as kernels
from hf_flash.reference import attention_reference, visibility_mask


def check_sparse(q, k, v, layout, *, dropout_p=0.0, lse_grad=False, **features):
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k = k.shape[1]
    elements = layout.to_dense_elements()
    mask_kwargs = {key: features[key] for key in ("causal", "key_padding_mask") if key in features}
    seen = (visibility_mask(seqlen_q, seqlen_k, device=q.device, **mask_kwargs) & elements).any(dim=2).any(dim=1)
    unseen_keys = ~seen.expand(batch, seqlen_k)

    def kernel(q, k, v, **kwargs):
        return hf_flash.block_sparse_attn_func(q, k, v, layout, **kwargs)

    def reference(q, k, v, **kwargs):
        return attention_reference(q, k, v, attn_mask=elements, **kwargs)

    return _check(kernel, reference, (q, k, v), (batch, nheads, seqlen_q, seqlen_k), unseen_keys,
                  dropout_p=dropout_p, lse_grad=lse_grad, features=features)


def _mask_mod_blocks(b, h, q_idx, kv_idx):
    """Per batch row and head: documents of 17 (+ b) query tokens against 23 (+ h) key tokens."""
    return (q_idx // (17 + b)) == (kv_idx // (23 + h))


# (name, builder(seqlen_q, seqlen_k, block_size, batch, nheads) -> layout). Windows and global counts
# are in tokens for local/global_tokens, in blocks for bigbird.
LAYOUTS = {
    "local": lambda sq, sk, bs, b, h: L.local(20, sq, sk, bs, device=DEVICE),
    "causal-window": lambda sq, sk, bs, b, h: L.local((24, 0), sq, sk, bs, device=DEVICE),
    "local|global": lambda sq, sk, bs, b, h: L.local(16, sq, sk, bs, device=DEVICE) | L.global_tokens(5, sq, sk, bs,
                                                                                                      device=DEVICE),
    "causal": lambda sq, sk, bs, b, h: L.causal(sq, sk, bs, device=DEVICE),
    "bigbird-per-head": lambda sq, sk, bs, b, h: L.bigbird(1, 1, 1, sq, sk, bs, nheads=h, seed=3, device=DEVICE),
    "butterfly": lambda sq, sk, bs, b, h: L.butterfly(sq, sk, bs, device=DEVICE),
    "mask_mod-per-batch-head": lambda sq, sk, bs, b, h: L.from_mask_mod(_mask_mod_blocks, sq, sk, bs, batch=b,
                                                                        nheads=h, device=DEVICE),
}

# (batch, nheads, nheads_kv, seqlen_q, seqlen_k, headdim, block_size, dtype)
CPU_CASES = [(1, 2, 2, 97, 97, 32, 32, FP32), (2, 2, 1, 70, 100, 24, 16, FP32)]
GPU_CASES = [(2, 4, 2, 1000, 1000, 64, 128, FP16), (2, 4, 4, 777, 1300, 128, 64, BF16),
             (1, 8, 2, 2048, 2048, 64, 128, BF16), (2, 4, 1, 1300, 500, 96, 128, FP16)]


def _id(case):
    b, h, hk, sq, sk, d, bs, dtype = case
    return f"B{b}-H{h}-K{hk}-Sq{sq}-Sk{sk}-D{d}-BS{bs}-{str(dtype).split('.')[-1]}"


@pytest.mark.parametrize("case", _pick(CPU_CASES, GPU_CASES), ids=_id)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts(name, case):
    b, h, hk, sq, sk, d, bs, dtype = case
    if not ON_GPU and name not in ("bigbird-per-head", "mask_mod-per-batch-head") and case is not CPU_CASES[0]:
        pytest.skip("CPU interpreter (slow): every layout on the first shape, per-head ones on both")
    check_sparse(*_qkv(b, h, hk, sq, sk, d, dtype), LAYOUTS[name](sq, sk, bs, b, h))


@pytest.mark.parametrize("extra", [dict(causal=True, key_padding_mask="left"), dict(key_padding_mask="right"),
                                   dict(causal=True, dropout_p=0.3, lse_grad=True)],
                         ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
def test_combined_with_causal_padding_dropout(extra):
    b, h, hk, sq, sk, d, bs, dtype = _pick([(2, 2, 1, 60, 75, 32, 32, FP32)], [(2, 8, 2, 1500, 1700, 64, 128, BF16)])[0]
    extra = dict(extra)
    if "key_padding_mask" in extra:
        extra["key_padding_mask"] = _padding_mask(b, sk, extra["key_padding_mask"])
    layout = L.local(20 if not ON_GPU else 300, sq, sk, bs, device=DEVICE) | L.global_tokens(7, sq, sk, bs, device=DEVICE)
    check_sparse(*_qkv(b, h, hk, sq, sk, d, dtype), layout, **extra)


@pytest.mark.parametrize("dq", ["atomic", "kernel"])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32, (128, 32)], ids=str)
def test_dropout_with_key_padding_at_small_layout_blocks(block_size, dtype, dq, monkeypatch):
    """Layout blocks of 16 or 32 keys make every kernel draw the dropout mask in 16- or 32-key tiles (_dropout_keep's
    small-tile paths), which the dense kernels' tiles never use; with key padding, full blocks are masked too. On
    the H200 the 16-key path gave fp16/bf16 outputs off by their own size there (tests/test_random.py,
    GPU_REGRESSIONS) while the interpreter was right. The dQ both summed with atomics and from its own kernel."""
    if not ON_GPU and block_size == (128, 32):
        pytest.skip("CPU interpreter (slow): the 16- and 32-key tiles are the point")
    monkeypatch.setattr(kernels.settings, "_ATOMIC_DQ", "dropout" if dq == "atomic" else "0")
    fresh_tuning(monkeypatch)
    b, h, hk, sq, sk, d = _pick([(1, 2, 1, 40, 70, 24)], [(2, 3, 3, 300, 333, 64)])[0]
    layout = L.local(24, sq, sk, block_size, device=DEVICE) | L.global_tokens(5, sq, sk, block_size, device=DEVICE)
    check_sparse(*_qkv(b, h, hk, sq, sk, d, dtype), layout, dropout_p=0.4, lse_grad=True,
                 key_padding_mask=_padding_mask(b, sk, "random"))


@pytest.mark.skipif(not ON_GPU, reason="the interpreter has a single config")
@pytest.mark.parametrize("dq", ["atomic", "kernel"])
@pytest.mark.parametrize("index", candidate_indices())
@pytest.mark.parametrize("head_dim, dtype", [(64, FP16), (128, BF16)], ids=["d64-fp16", "d128-bf16"])
def test_every_config_is_exact_with_dropout_and_padding(head_dim, dtype, index, dq, monkeypatch):
    """test_features.py's test of the same name on the block-sparse path: each candidate the search may pick for
    128-token layout blocks, under dropout and key padding, with a window | global-token layout and GQA."""
    monkeypatch.setattr(kernels.settings, "_ATOMIC_DQ", "dropout" if dq == "atomic" else "0")
    monkeypatch.setattr(kernels.settings, "_DKDV_ROWS", "tune")
    (b, h, hk, sq, sk), block = _pick([((1, 3, 1, 150, 140), 64)], [((2, 6, 2, 700, 777), 128)])[0]
    one_candidate_each(monkeypatch, index, head_dim, dtype, DROPOUT=True, SPARSE=True, LAYOUT_BQ=block,
                        LAYOUT_BK=block)
    layout = L.local(100, sq, sk, block, device=DEVICE) | L.global_tokens(20, sq, sk, block, device=DEVICE)
    check_sparse(*_qkv(b, h, hk, sq, sk, head_dim, dtype), layout, dropout_p=0.3, lse_grad=True,
                 key_padding_mask=_padding_mask(b, sk, "random"))


@pytest.mark.parametrize("rows", ["0", "1"])
def test_atomic_dq(rows, monkeypatch):
    """kernels.settings._ATOMIC_DQ: the block-sparse dK/dV kernel sums dQ with atomics over its kept query blocks; in
    both orientations of its tiles (kernels.settings._DKDV_ROWS), with a mask_mod rule and partial tiles."""
    monkeypatch.setattr(kernels.settings, "_ATOMIC_DQ", "1")
    monkeypatch.setattr(kernels.settings, "_DKDV_ROWS", rows)
    fresh_tuning(monkeypatch)  # the orientation is tuned: start from no tuned configs
    b, h, hk, sq, sk, d, bs, dtype = _pick([(2, 2, 1, 60, 75, 32, 32, FP32)], [(2, 8, 2, 1500, 1700, 64, 128, BF16)])[0]
    layout = LAYOUTS["bigbird-per-head"](sq, sk, bs, b, h)
    check_sparse(*_qkv(b, h, hk, sq, sk, d, dtype), layout, causal=True, dropout_p=0.3, lse_grad=True,
                 key_padding_mask=_padding_mask(b, sk, "right"))


def test_empty_rows_and_columns():
    """A query block with no kept key block outputs 0 (lse +inf, dq 0); unvisited keys get dk = dv = 0."""
    sq, sk, bs = _pick([(48, 64, 16)], [(1000, 1200, 128)])[0]
    n_q, n_kv = -(-sq // bs), -(-sk // bs)
    blocks = torch.rand(2, n_q, n_kv, device=DEVICE) > 0.5
    blocks[0, 1] = False  # head 0: query block 1 sees nothing
    blocks[1, :, 2] = False  # head 1: key block 2 is never visited
    layout = L.from_dense(blocks, sq, sk, bs)
    out, lse, (dq, dk, dv) = check_sparse(*_qkv(2, 2, 2, sq, sk, 32, FP32 if not ON_GPU else FP16), layout)
    assert torch.isinf(lse[:, 0, bs:2 * bs]).all()
    assert (dk[:, 2 * bs:3 * bs, 1] == 0).all()


def test_kernel_tiles_smaller_than_layout_blocks_in_work_order():
    """Layout blocks of 128 hold several kernel tiles (2 query tiles, 4 key tiles on the CPU interpreter), the
    last layout block is ragged, and each head starts its blocks in another order (longest first): every
    tile must still run exactly once. With GQA, a key block's order comes from its group's first head."""
    sq, sk, bs = 300, 280, 128
    blocks = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 1, 1]],  # head 0: the last query block is longest
                           [[1, 1, 1], [0, 1, 0], [0, 0, 1]],  # head 1: the first one is
                           [[0, 1, 0], [1, 1, 1], [1, 0, 0]],
                           [[1, 0, 1], [0, 0, 1], [1, 1, 1]]], dtype=torch.bool, device=DEVICE)
    layout = L.from_dense(blocks, sq, sk, bs)
    ly = layout.kernel_tensors()[0]
    kept = [ly.kv_num_blocks + ly.full_kv_num_blocks, ly.q_num_blocks + ly.full_q_num_blocks]  # per row, per column
    for lengths, order, major in zip(kept, (ly.q_order, ly.k_order), (ly.q_major, ly.k_major)):
        assert (torch.sort(order, dim=-1).values == torch.arange(order.shape[-1], device=DEVICE)).all()
        assert (lengths.gather(-1, order.long()).diff(dim=-1) <= 0).all()  # longest first
        assert major.item() == 0  # no row over 3x the mean
    check_sparse(*_qkv(1, 4, 2, sq, sk, 16, FP32 if not ON_GPU else BF16), layout)
    # the same with block-major tiles (global tokens: one row and one column are long)
    layout = L.global_tokens(5, sq, sk, 16, device=DEVICE) | L.local(8, sq, sk, 16, device=DEVICE)
    ly = layout.kernel_tensors()[0]
    assert (ly.q_major.item(), ly.k_major.item()) == (1, 1)
    check_sparse(*_qkv(1, 4, 2, sq, sk, 16, FP32 if not ON_GPU else BF16), layout)


@pytest.mark.parametrize("seqlen", _pick([83], [1024, 1500]))
def test_fully_dense_layout_equals_dense_kernel(seqlen):
    dtype = FP32 if not ON_GPU else BF16
    bs = 32 if not ON_GPU else 128
    q, k, v = _qkv(*_pick([(1, 2, 1)], [(2, 4, 2)])[0], seqlen, seqlen, 32, dtype)
    n = -(-seqlen // bs)
    every = L.from_dense(torch.ones(n, n, dtype=torch.bool, device=DEVICE), seqlen, seqlen, bs)
    for causal in (False, True):
        dout = torch.randn_like(q)
        dense = hf_flash.flash_attn_func(q, k, v, causal=causal)
        sparse = hf_flash.block_sparse_attn_func(q, k, v, every, causal=causal)
        grads_dense = torch.autograd.grad(dense, (q, k, v), dout)
        grads_sparse = torch.autograd.grad(sparse, (q, k, v), dout)
        # The same tiles, visited in another order (the ragged last block is partial, so it comes first).
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == FP32 else dict(rtol=0, atol=2e-2)
        for a, b in zip((dense, *grads_dense), (sparse, *grads_sparse)):
            torch.testing.assert_close(a, b, **tol)


def test_kernel_lists_demote_diagonal_and_ragged_blocks():
    sq, sk, bs = 75, 75, 16
    layout = L.local(10, sq, sk, bs) | L.global_tokens(3, sq, sk, bs)
    tensors, block_q, block_k = layout.kernel_tensors(is_causal=True)
    assert layout.kernel_tensors(is_causal=True)[0] is tensors and (block_q, block_k) == (bs, bs)
    full = _from_csr(tensors.full_kv_num_blocks, tensors.full_kv_indices, 5)
    rebuilt = L.BlockSparseLayout.from_block_masks(full, _from_csr(tensors.kv_num_blocks, tensors.kv_indices, 5),
                                                   sq, sk, bs)
    assert torch.equal(rebuilt.to_dense(), layout.to_dense() & L.causal(sq, sk, bs).to_dense())
    full = rebuilt.to_dense("full")
    assert not full[..., -1].any(), "the ragged last key block must be partial"
    assert not (full[0, 0] & torch.eye(5, dtype=torch.bool)).any(), "diagonal blocks must be partial"


def test_tiles_hold_the_mask_mod_bits():
    sq, sk, bs = 75, 90, 16
    layout = L.from_mask_mod(lambda b, h, q, kv: (q // 7) % 3 != (kv // 5) % 3, sq, sk, bs)
    ly = layout.kernel_tensors()[0]
    tile_index, tiles = ly.tile_index, ly.tiles
    assert ly.rule.numel() == 0 and tiles.numel() > 0
    masks = ((tiles[..., None] >> torch.arange(32)) & 1).flatten(-2)[..., :bs].bool()
    elements = layout.to_dense_elements()[0, 0]
    for i, j in (tile_index[0, 0] >= 0).nonzero().tolist():
        expected = torch.zeros(bs, bs, dtype=torch.bool)
        block = elements[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
        expected[:block.shape[0], :block.shape[1]] = block
        assert torch.equal(masks[tile_index[0, 0, i, j]], expected)


RULE_LAYOUTS = {
    "local": lambda sq, sk: L.local(9, sq, sk, 16),
    "causal": lambda sq, sk: L.causal(sq, sk, 16),
    "causal-window": lambda sq, sk: L.local((20, 0), sq, sk, 16),
    "global": lambda sq, sk: L.global_tokens(5, sq, sk, 16),
    "local|global": lambda sq, sk: L.local((7, 3), sq, sk, 16) | L.global_tokens(19, sq, sk, 16),
    "local&causal": lambda sq, sk: L.local(30, sq, sk, 16) & L.causal(sq, sk, 16),
    "local|local": lambda sq, sk: L.local((3, 20), sq, sk, 16) | L.local((25, 2), sq, sk, 16),
    "bigbird|local": lambda sq, sk: L.bigbird(0, 0, 1, sq, sk, 16) | L.local(12, sq, sk, 16),
    "global&global": lambda sq, sk: L.global_tokens(4, sq, sk, 16) & L.global_tokens(20, sq, sk, 16),
}


@pytest.mark.parametrize("name", list(RULE_LAYOUTS))
@pytest.mark.parametrize("sq, sk", [(70, 70), (50, 83), (83, 50), (64, 96)])
def test_element_rules_equal_the_mask_mod_in_partial_blocks(name, sq, sk):
    """The inline rule (what the kernels evaluate instead of tiles) agrees with mask_mod on every block the kernels
    treat as partial: the layout's partial blocks, and its last key column when seqlen_k is ragged. A union with a
    plain layout that keeps blocks in that column has no rule (tiles instead)."""
    layout = RULE_LAYOUTS[name](sq, sk)
    if name == "bigbird|local" and sk % 16:
        assert layout.element_rule is None and layout.kernel_tensors()[0].rule.numel() == 0
        return
    assert layout.element_rule is not None
    left, right, n_global = layout.kernel_tensors()[0].rule.tolist()
    i, j = torch.arange(sq).view(-1, 1), torch.arange(sk).view(1, -1)
    offset = j - i - (sk - sq)
    rule = ((offset >= -left) & (offset <= right)) | (i < n_global) | (j < n_global)
    blocks = layout.to_dense("partial")[0, 0].clone()
    if sk % 16:
        blocks[:, -1] |= layout.to_dense()[0, 0, :, -1]
    partial = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)[:sq, :sk]
    elements = layout.to_dense_elements()[0, 0]
    assert torch.equal(rule & partial, elements & partial)


@triton.jit
def _rule_trim_probe(OUT, IDX, RULE, lo, hi, fixed_lo, fixed_hi, diag, KEYS: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
                     BLOCK: tl.constexpr):
    lo, hi = kernels.masking._rule_trim(lo, hi, IDX, RULE, fixed_lo, fixed_hi, diag, KEYS, LAYOUT_BLOCK, BLOCK)
    tl.store(OUT, lo)
    tl.store(OUT + 1, hi)


@pytest.mark.parametrize("keys", [True, False])
def test_rule_trim_drops_exactly_the_wholly_masked_end_tiles(keys):
    """The partial-block loops start and end past the tiles the rule masks whole: as many as there are at each
    end (at most a layout block's worth), and never a tile that keeps an element."""
    rng = random.Random(0)
    layout_block, block, n_blocks = 64, 16, 6
    per_block = layout_block // block
    trimmed = 0
    for _ in range(60):
        left, right = rng.choice([0, 3, 40, 100, 2**30]), rng.choice([0, 5, 30, 2**30])
        rule = (left, right, rng.choice([0, 0, 7]))
        listed = sorted(rng.sample(range(n_blocks), rng.randint(1, n_blocks)))
        diag = rng.choice([0, 13, -21])
        fixed_lo = rng.randrange(0, n_blocks * layout_block - block)
        fixed = (fixed_lo, fixed_lo + block - 1)
        lo, hi = 0, len(listed) * layout_block

        def visits(start):  # brute force over the tile's elements
            queries, keys_ = range(fixed[0], fixed[1] + 1), range(start, start + block)
            if not keys:
                queries, keys_ = keys_, queries
            return any(-rule[0] <= j - i - diag <= rule[1] or i < rule[2] or j < rule[2] for i in queries for j in keys_)
        starts = [listed[it // block // per_block] * layout_block + it // block % per_block * block
                  for it in range(lo, hi, block)]
        front = min(next((n for n, s in enumerate(starts) if visits(s)), len(starts)), per_block)
        rest = starts[front:]
        back = min(next((n for n, s in enumerate(reversed(rest)) if visits(s)), len(rest)), per_block)
        expected = (lo + front * block, hi - back * block)
        trimmed += front + back > 0
        out = torch.zeros(2, dtype=torch.int32, device=DEVICE)
        idx = torch.tensor(listed + [0] * (n_blocks - len(listed)), dtype=torch.int32, device=DEVICE)
        _rule_trim_probe[(1,)](out, idx, torch.tensor(rule, dtype=torch.int32, device=DEVICE), lo, hi, *fixed, diag,
                               keys, layout_block, block)
        assert tuple(out.tolist()) == expected, (rule, listed, diag, fixed)
        assert not any(visits(s) for s in starts[:(expected[0] - lo) // block] + starts[(expected[1] - lo) // block:])
    assert trimmed > 10  # the cases exercise trimming


def test_window_intersected_with_global_tokens_falls_back_to_tiles():
    layout = L.local(9, 70, block_size=16) & L.global_tokens(5, 70, block_size=16)
    assert layout.element_rule is None and layout.kernel_tensors()[0].tiles.numel() > 0


def test_bad_arguments():
    q, k, v = _qkv(1, 2, 2, 40, 40, 16, FP32)
    layout = L.local(8, 40, block_size=16, device=DEVICE)
    with pytest.raises(TypeError, match="layout must be a hf_flash.BlockSparseLayout"):
        hf_flash.block_sparse_attn_func(q, k, v, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout is for seqlen_q=48"):
        hf_flash.block_sparse_attn_func(q, k, v, L.local(8, 48, block_size=16, device=DEVICE))
    with pytest.raises(ValueError, match="heads 3"):
        hf_flash.block_sparse_attn_func(q, k, v, L.bigbird(1, 0, 1, 40, block_size=16, nheads=3, device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p"):
        hf_flash.block_sparse_attn_func(q, k, v, layout, dropout_p=1.0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        hf_flash.block_sparse_attn_func(q, k, v, layout, key_padding_mask=torch.ones(1, 41, dtype=torch.bool,
                                                                                    device=DEVICE))


def test_torch_compile_fullgraph():
    """The layout's kernel lists go through the custom op as a list of tensors, forward and backward."""
    q, k, v = _qkv(1, 2, 1, 70, 70, 32, FP32 if not ON_GPU else FP16)
    layout = L.local(16, 70, block_size=32, device=DEVICE) | L.global_tokens(3, 70, block_size=32, device=DEVICE)

    def loss_fn(q, k, v):
        return hf_flash.block_sparse_attn_func(torch.tanh(q), k, v, layout, causal=True).float().square().mean()

    assert_compiled_matches(loss_fn, (q, k, v), loss_atol=1e-5, grad_atol=2e-4)


@pytest.mark.parametrize("shape", [(71, 255, (64, 128)), (40, 70, 32)], ids=["Sq71-Sk255-BS64x128", "Sq40-Sk70-BS32"])
def test_union_with_a_plain_layout_at_a_ragged_edge(shape):
    """A layout without mask_mod attends its kept blocks whole, ragged edge blocks too, which stay partial in a
    union with a sliding window: the window's element rule must not mask them (found by tests/test_random.py: out
    error 4.6 with bigbird | local(77) at Sq 71, Sk 255, block (64, 128), where every element is attended)."""
    sq, sk, bs = shape
    plain = L.bigbird(2, 1, 1, sq, sk, bs, nheads=2, seed=3, device=DEVICE)
    union = plain | L.local(sq // 2, sq, sk, bs, device=DEVICE)
    assert torch.equal(union.to_dense_elements(), plain.to_dense_elements() | L.local(sq // 2, sq, sk, bs,
                                                                                      device=DEVICE).to_dense_elements())
    check_sparse(*_qkv(1, 2, 2, sq, sk, 32, FP32), union)
