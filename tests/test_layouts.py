"""Block-sparse layouts against brute-force dense masks: builders, CSR fields, | and &, densities."""

import dataclasses
import functools
import itertools

import pytest
import torch
from conftest import DEVICE

from hf_flash import layouts as L
from hf_flash.layouts._blocks import _from_csr
from hf_flash.layouts.layout import _CSR_FIELDS
from hf_flash.layouts import BlockSparseLayout

# (seqlen_q, seqlen_k, block_size): ragged tails, seqlen_q != seqlen_k both ways, one (block_q, block_k) pair.
GRIDS = [(97, 97, 64), (300, 300, 128), (1000, 1000, 64), (300, 97, 64), (97, 300, 128), (1000, 300, 64),
         (300, 300, (64, 128))]


def _grid_id(grid):
    sq, sk, bs = grid
    return f"Sq{sq}-Sk{sk}-BS{'x'.join(map(str, bs)) if isinstance(bs, tuple) else bs}"


def _blocks(bs):
    return bs if isinstance(bs, tuple) else (bs, bs)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are small: OpenMP's fork/join on them costs more than it saves (3-4x the
    suite's time on a busy 2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- brute force: plain Python loops over rows and blocks ------------------------------------

def _rows_mask(sq, sk, keys_of_row):
    """bool (sq, sk) from keys_of_row(i) -> list of (first, last) inclusive key ranges (clipped here)."""
    mask = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        for first, last in keys_of_row(i):
            first, last = max(first, 0), min(last, sk - 1)
            if first <= last:
                mask[i, first:last + 1] = True
    return mask


def brute_causal(sq, sk):
    return _rows_mask(sq, sk, lambda i: [(0, i + sk - sq)])


def brute_window(sq, sk, left, right):
    return _rows_mask(sq, sk, lambda i: [(i + sk - sq - left, i + sk - sq + right)])


def brute_global(sq, sk, n):
    return _rows_mask(sq, sk, lambda i: [(0, sk - 1)] if i < n else [(0, n - 1)])


def brute_classes(elements, bs):
    """(kept, full) bool (n_q_blocks, n_kv_blocks): some / every element of each block attended."""
    bq, bk = _blocks(bs)
    sq, sk = elements.shape
    nq, nk = -(-sq // bq), -(-sk // bk)
    kept, full = torch.zeros(nq, nk, dtype=torch.bool), torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            tile = elements[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            kept[i, j], full[i, j] = bool(tile.any()), bool(tile.all())
    return kept, full


def brute_expand(blocks, sq, sk, bs):
    """The element mask of a block-level layout: every element of a kept block."""
    bq, bk = _blocks(bs)
    elements = torch.zeros(sq, sk, dtype=torch.bool)
    for i, j in blocks.nonzero().tolist():
        elements[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] = True
    return elements


def check_csr(layout):
    """The CSR invariants: dtypes and shapes, sorted rows, permutation padding, disjoint, transposes."""
    B, H, nq, nk = layout.shape
    dense = {}
    for prefix, rows, cols in (("kv", nq, nk), ("full_kv", nq, nk), ("q", nk, nq), ("full_q", nk, nq)):
        num, indices = getattr(layout, f"{prefix}_num_blocks").cpu(), getattr(layout, f"{prefix}_indices").cpu()
        assert num.dtype == indices.dtype == torch.int32
        assert tuple(num.shape) == (B, H, rows) and tuple(indices.shape) == (B, H, rows, cols)
        assert torch.equal(indices.sort(-1).values, torch.arange(cols, dtype=torch.int32).expand_as(indices))
        mask = torch.zeros(B, H, rows, cols, dtype=torch.bool)
        for b, h, r in itertools.product(range(B), range(H), range(rows)):
            kept = indices[b, h, r, :num[b, h, r]].tolist()
            assert kept == sorted(kept), f"{prefix}_indices row {(b, h, r)} is not increasing"
            mask[b, h, r, kept] = True
        dense[prefix] = mask
    assert not (dense["kv"] & dense["full_kv"]).any(), "a block is both partial and full"
    assert torch.equal(dense["q"], dense["kv"].transpose(-1, -2))
    assert torch.equal(dense["full_q"], dense["full_kv"].transpose(-1, -2))
    assert torch.equal(layout.to_dense("partial").cpu(), dense["kv"])
    assert torch.equal(layout.to_dense("full").cpu(), dense["full_kv"])
    assert torch.equal(layout.to_dense().cpu(), dense["kv"] | dense["full_kv"])


def check_against(layout, elements):
    """layout (B, H) against a brute-force element mask (B, H, sq, sk) or (sq, sk)."""
    check_csr(layout)
    elements = elements.expand(*layout.shape[:2], *elements.shape[-2:])
    assert torch.equal(layout.to_dense_elements().cpu(), elements.cpu())
    kept_and_full = [[brute_classes(elements[b, h], layout.block_size) for h in range(elements.shape[1])]
                     for b in range(elements.shape[0])]
    kept = torch.stack([torch.stack([k for k, _ in row]) for row in kept_and_full])
    full = torch.stack([torch.stack([f for _, f in row]) for row in kept_and_full])
    assert torch.equal(layout.to_dense().cpu(), kept.cpu())
    assert torch.equal(layout.to_dense("full").cpu(), full.cpu())  # classes are exact: a partial block has a hole


# --- builders --------------------------------------------------------------------------------

# In (100, 129, 64) the diagonal touches block (1, 2) in its corner element only.
@pytest.mark.parametrize("grid", GRIDS + [(100, 129, 64)], ids=_grid_id)
def test_causal(grid):
    sq, sk, bs = grid
    check_against(L.causal(sq, sk, bs), brute_causal(sq, sk))


# 63 and (127, 0) put a block edge exactly on the band's edge (full, not partial).
@pytest.mark.parametrize("window", [0, 63, 100, 256, (127, 0), (0, 200)], ids=str)
@pytest.mark.parametrize("grid", GRIDS, ids=_grid_id)
def test_local(grid, window):
    sq, sk, bs = grid
    left, right = window if isinstance(window, tuple) else (window, window)
    check_against(L.local(window, sq, sk, bs), brute_window(sq, sk, left, right))


@pytest.mark.parametrize("n", [0, 64, 200])
@pytest.mark.parametrize("grid", GRIDS, ids=_grid_id)
def test_global_tokens(grid, n):
    sq, sk, bs = grid
    check_against(L.global_tokens(n, sq, sk, bs), brute_global(sq, sk, n))


@pytest.mark.parametrize("grid", GRIDS, ids=_grid_id)
def test_butterfly(grid):
    sq, sk, bs = grid
    bq, bk = _blocks(bs)
    blocks = torch.tensor([[i == j or bin(i ^ j).count("1") == 1 for j in range(-(-sk // bk))]
                           for i in range(-(-sq // bq))])
    layout = L.butterfly(sq, sk, bs)
    check_against(layout, brute_expand(blocks, sq, sk, bs))
    assert layout.mask_mod is None and not layout.to_dense("partial").any()


@pytest.mark.parametrize("grid", GRIDS, ids=_grid_id)
def test_bigbird(grid):
    sq, sk, bs = grid
    bq, bk = _blocks(bs)
    window, n_global, n_random, nheads = 1, 1, 2, 3
    layout = L.bigbird(window, n_global, n_random, sq, sk, bs, nheads=nheads, seed=1)
    assert layout.shape[:2] == (1, nheads) and layout.mask_mod is None
    nq, nk = -(-sq // bq), -(-sk // bk)
    fixed = torch.tensor([[abs(i - j) <= window or i < n_global or j < n_global for j in range(nk)]
                          for i in range(nq)])
    dense = layout.to_dense()[0]
    check_against(layout, torch.stack([brute_expand(dense[h], sq, sk, bs) for h in range(nheads)])[None])
    for h in range(nheads):
        assert torch.equal(dense[h] & fixed, fixed)
        for i in range(nq):
            assert (dense[h, i] & ~fixed[i]).sum() == min(n_random, int((~fixed[i]).sum()))
    again = L.bigbird(window, n_global, n_random, sq, sk, bs, nheads=nheads, seed=1)
    assert torch.equal(again.to_dense(), layout.to_dense()), "the same seed must give the same layout"


def test_bigbird_heads_and_seeds_differ():
    a = L.bigbird(1, 1, 3, 4096, nheads=2, seed=0).to_dense()
    b = L.bigbird(1, 1, 3, 4096, nheads=2, seed=1).to_dense()
    assert not torch.equal(a[0, 0], a[0, 1]) and not torch.equal(a, b)


@pytest.mark.parametrize("grid", GRIDS, ids=_grid_id)
def test_from_dense(grid):
    sq, sk, bs = grid
    bq, bk = _blocks(bs)
    blocks = torch.rand(2, 3, -(-sq // bq), -(-sk // bk)) < 0.4
    layout = L.from_dense(blocks, sq, sk, bs)
    assert layout.shape[:2] == (2, 3) and not layout.to_dense("partial").any()
    elements = torch.stack([torch.stack([brute_expand(blocks[b, h], sq, sk, bs) for h in range(3)]) for b in range(2)])
    check_against(layout, elements)
    assert L.from_dense(blocks[0, 0], sq, sk, bs).shape[:2] == (1, 1)
    assert L.from_dense(blocks[0], sq, sk, bs).shape[:2] == (1, 3)


@pytest.mark.parametrize("grid", [GRIDS[0], GRIDS[3], GRIDS[4], GRIDS[6]], ids=_grid_id)
def test_from_mask_mod_per_batch_and_head(grid):
    """A mask_mod that depends on b (documents, by indexing a tensor) and on h (a window per head)."""
    sq, sk, bs = grid
    doc_q = torch.stack([torch.arange(sq) // 150, torch.arange(sq) // 40])
    doc_k = torch.stack([torch.arange(sk) // 150, torch.arange(sk) // 40])

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_q[b, q_idx] == doc_k[b, kv_idx]) & ((q_idx - kv_idx).abs() <= 30 * (h + 1))

    layout = L.from_mask_mod(mask_mod, sq, sk, bs, batch=2, nheads=2)
    assert layout.mask_mod is mask_mod
    elements = torch.stack([torch.stack([
        _rows_mask(sq, sk, lambda i: [(max(i - 30 * (h + 1), int((doc_k[b] < doc_q[b, i]).sum())),
                                       min(i + 30 * (h + 1), int((doc_k[b] <= doc_q[b, i]).sum()) - 1))])
        for h in range(2)]) for b in range(2)])
    check_against(layout, elements)


@pytest.mark.parametrize("grid", GRIDS[:3], ids=_grid_id)
def test_from_mask_mod_matches_structured_builders(grid):
    sq, sk, bs = grid
    for built, mask_mod in [(L.causal(sq, sk, bs), L.causal_mask_mod(sq, sk)),
                            (L.local(100, sq, sk, bs), L.sliding_window_mask_mod(100, sq, sk)),
                            (L.global_tokens(70, sq, sk, bs), L.global_tokens_mask_mod(70))]:
        generic = L.from_mask_mod(mask_mod, sq, sk, bs)
        for which in ("partial", "full"):
            assert torch.equal(built.to_dense(which), generic.to_dense(which))


def test_mask_mod_combinators():
    q, kv = torch.arange(50).view(-1, 1), torch.arange(50).view(1, -1)
    causal, window = L.causal_mask_mod(50), L.sliding_window_mask_mod(5, 50)
    assert torch.equal(L.and_masks(causal, window)(0, 0, q, kv), (kv <= q) & ((q - kv).abs() <= 5))
    assert torch.equal(L.or_masks(causal, window)(0, 0, q, kv), (kv <= q) | ((q - kv).abs() <= 5))
    assert L.and_masks()(0, 0, q, kv).all() and not L.or_masks()(0, 0, q, kv).any()
    assert "causal" in L.and_masks(causal, window).__name__


# --- | and & ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)  # shared by the pairs of a grid; nothing mutates them
def _operands(sq, sk, bs):
    """(layout, brute-force elements (B, H, sq, sk)) pairs: element-level, block-level, per batch and head."""
    bq, bk = _blocks(bs)
    bigbird = L.bigbird(0, 1, 1, sq, sk, bs, nheads=2, seed=3)
    per_head = L.from_mask_mod(lambda b, h, q, kv: (q + kv + h + 2 * b) % 3 == 0, sq, sk, bs, batch=2, nheads=2)
    qk = torch.arange(sq).view(-1, 1) + torch.arange(sk).view(1, -1)
    return {
        "causal": (L.causal(sq, sk, bs), brute_causal(sq, sk)[None, None]),
        "local": (L.local(90, sq, sk, bs), brute_window(sq, sk, 90, 90)[None, None]),
        "global": (L.global_tokens(20, sq, sk, bs), brute_global(sq, sk, 20)[None, None]),
        "bigbird": (bigbird, torch.stack([brute_expand(bigbird.to_dense()[0, h], sq, sk, bs) for h in range(2)])[None]),
        "per_head": (per_head, torch.stack([torch.stack([(qk + h + 2 * b) % 3 == 0 for h in range(2)])
                                            for b in range(2)])),
    }


PAIRS = [("local", "global"), ("local", "causal"), ("causal", "bigbird"), ("global", "per_head"),
         ("bigbird", "bigbird"), ("per_head", "causal")]


@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
@pytest.mark.parametrize("grid", [GRIDS[3], GRIDS[5], GRIDS[6]], ids=_grid_id)
def test_union_and_intersection(grid, pair):
    sq, sk, bs = grid
    operands = _operands(sq, sk, bs)
    (a, elements_a), (b, elements_b) = operands[pair[0]], operands[pair[1]]
    check_against(a | b, elements_a | elements_b)
    check_against(a & b, elements_a & elements_b)
    check_against((a | b) & a, (elements_a | elements_b) & elements_a)  # nested combinations


def test_causal_window_two_ways():
    one, two = L.local((256, 0), 1000, block_size=64), L.local(256, 1000, block_size=64) & L.causal(1000, block_size=64)
    for which in ("partial", "full"):
        assert torch.equal(one.to_dense(which), two.to_dense(which))
    assert torch.equal(one.to_dense_elements(), two.to_dense_elements())


# --- densities of the benchmark masks, as FlexAttention's BlockMask.sparsity() reports them -----

@pytest.mark.parametrize("name, seqlen, expected", [
    ("window256+global64", 4096, 0.207), ("window256+global64", 16384, 0.054),
    ("causal_window256", 16384, 0.023), ("causal", 16384, 0.504)])
def test_anchor_densities(name, seqlen, expected):
    layout = {"window256+global64": lambda s: L.local(256, s) | L.global_tokens(64, s),
              "causal_window256": lambda s: L.local(256, s) & L.causal(s),
              "causal": lambda s: L.causal(s)}[name](seqlen)
    assert layout.block_size == 128 and round(layout.density, 3) == expected


def test_matches_flex_attention_block_mask():
    """Same partial and full blocks as torch's create_block_mask (where FlexAttention imports)."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    seqlen = 1024
    window, glob, causal = (L.sliding_window_mask_mod(256, seqlen), L.global_tokens_mask_mod(64),
                            L.causal_mask_mod(seqlen))
    for ours, mask_mod in [(L.local(256, seqlen) | L.global_tokens(64, seqlen), L.or_masks(window, glob)),
                           (L.local(256, seqlen) & L.causal(seqlen), L.and_masks(window, causal))]:
        theirs = flex.create_block_mask(mask_mod, 1, 1, seqlen, seqlen, device="cpu", BLOCK_SIZE=128)
        nk = ours.n_kv_blocks
        assert torch.equal(ours.to_dense("partial"), _from_csr(theirs.kv_num_blocks, theirs.kv_indices, nk))
        assert torch.equal(ours.to_dense("full"), _from_csr(theirs.full_kv_num_blocks, theirs.full_kv_indices, nk))


# --- devices, repr, pictures ----------------------------------------------------------------

def test_builders_follow_the_device():
    sq, sk = 300, 200
    layouts = [L.causal(sq, sk, 64, device=DEVICE), L.local(50, sq, sk, 64, device=DEVICE),
               L.global_tokens(10, sq, sk, 64, device=DEVICE), L.butterfly(sq, sk, 64, device=DEVICE),
               L.bigbird(1, 1, 1, sq, sk, 64, nheads=2, device=DEVICE),
               L.from_mask_mod(lambda b, h, q, kv: q >= kv, sq, sk, 64, device=DEVICE),
               L.local(50, sq, sk, 64, device=DEVICE) | L.global_tokens(10, sq, sk, 64, device=DEVICE)]
    for layout in layouts:
        assert all(getattr(layout, name).device.type == torch.device(DEVICE).type for name in _CSR_FIELDS)
        layout.to_dense_elements()
        moved = layout.to("cpu")
        assert moved.device.type == "cpu" and torch.equal(moved.to_dense_elements(), layout.to_dense_elements().cpu())
    union = layouts[1].to("cpu") | layouts[2].to("cpu")
    assert torch.equal(union.to_dense_elements(), layouts[-1].to_dense_elements().cpu())


def test_repr_and_pictures(capsys):
    layout = L.local(256, 4096) | L.global_tokens(64, 4096)
    text = repr(layout)
    for part in ("seqlen_q=4096", "block_size=128", "blocks=32x32", "heads=shared", "density=0.207", "sliding_window"):
        assert part in text
    assert "heads=2 (per head)" in repr(L.bigbird(1, 1, 1, 1000, nheads=2, block_size=64))

    lines = L.causal(300, block_size=64).picture().splitlines()
    assert lines[1:] == ["░····", "█░···", "██░··", "███░·", "████░"]
    big = L.causal(16384).picture(max_blocks=32).splitlines()
    assert len(big) == 33 and all(len(row) == 32 for row in big[1:]) and "4x4 blocks" in big[0]
    assert big[1][0] == "░" and big[2][0] == "█" and big[1][-1] == "·"
    L.bigbird(1, 1, 1, 1000, nheads=2, block_size=64).show(head=1)
    assert "head 1" in capsys.readouterr().out


def test_save_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "causal.png"
    L.causal(1000, block_size=64).save_png(path)
    assert path.stat().st_size > 0


def test_block_size_is_an_int_when_square():
    assert L.causal(300, block_size=64).block_size == 64
    layout = L.causal(300, block_size=(64, 128))
    assert layout.block_size == (64, 128) and (layout.block_q, layout.block_k) == (64, 128)
    assert layout.shape == (1, 1, 5, 3)


# --- bad arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, name", [
    (lambda: L.local(-1, 128), ValueError, "window"),
    (lambda: L.local((1, 2, 3), 128), ValueError, "window"),
    (lambda: L.local(1.5, 128), TypeError, "window"),
    (lambda: L.causal(128, block_size=100), ValueError, "block_size"),
    (lambda: L.causal(128, block_size=8), ValueError, "block_size"),
    (lambda: L.causal(128, block_size="128"), TypeError, "block_size"),
    (lambda: L.causal(128, block_size=(64,)), ValueError, "block_size"),
    (lambda: L.causal(0), ValueError, "seqlen_q"),
    (lambda: L.causal(128, 1.0), TypeError, "seqlen_k"),
    (lambda: L.global_tokens(-1, 128), ValueError, "n"),
    (lambda: L.bigbird(1, 1, -1, 128), ValueError, "n_random"),
    (lambda: L.bigbird(1, 1, 1, 128, nheads=0), ValueError, "nheads"),
    (lambda: L.from_dense(torch.ones(3, 3, dtype=torch.bool), 128), ValueError, "block_mask"),
    (lambda: L.from_dense(torch.ones(1, 1), 128), TypeError, "block_mask"),
    (lambda: L.from_mask_mod("causal", 128), TypeError, "mask_mod"),
    (lambda: L.from_mask_mod(lambda b, h, q, kv: q - kv, 128), TypeError, "mask_mod"),
    (lambda: L.from_mask_mod(lambda b, h, q, kv: q >= kv, 128, batch=0), ValueError, "batch"),
    (lambda: L.causal(256) | L.causal(256, block_size=64), ValueError, "block_size"),
    (lambda: L.causal(256) & L.causal(300), ValueError, "seqlen_q"),
    (lambda: L.causal(256, 300) | L.causal(256), ValueError, "seqlen_k"),
    (lambda: L.bigbird(1, 1, 1, 256, nheads=2) | L.bigbird(1, 1, 1, 256, nheads=3), ValueError, "shapes"),
    (lambda: L.causal(256).to_dense("elements"), ValueError, "which"),
    (lambda: L.causal(256).picture(head=1), ValueError, "head"),
    (lambda: L.and_masks(L.causal_mask_mod(8), None), TypeError, "mask_mods"),
])
def test_bad_arguments(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_union_with_a_non_layout_is_a_type_error():
    with pytest.raises(TypeError):
        L.causal(256) | 1


def test_direct_construction_checks_fields():
    layout = L.causal(300, block_size=64)
    fields = {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}
    with pytest.raises(TypeError, match="kv_indices"):
        BlockSparseLayout(**{**fields, "kv_indices": layout.kv_indices.long()})
    with pytest.raises(ValueError, match="q_num_blocks"):
        BlockSparseLayout(**{**fields, "q_num_blocks": layout.q_num_blocks[..., :-1]})


@pytest.mark.parametrize("grid", [GRIDS[3], GRIDS[6]], ids=_grid_id)
def test_partial_block_masks_rebuild_the_elements(grid):
    sq, sk, bs = grid
    operands = _operands(sq, sk, bs)
    causal = L.causal(sq, sk, bs)
    layouts = [operands["local"][0] | operands["per_head"][0], causal, operands["bigbird"][0],
               # partial blocks without a mask_mod: attended whole
               BlockSparseLayout.from_block_masks(causal.to_dense("full"), causal.to_dense(), sq, sk, bs)]
    for layout in layouts:
        tile_index, tiles = layout.partial_block_masks()
        assert tile_index.dtype == torch.int32 and tuple(tile_index.shape) == layout.shape
        assert torch.equal(tile_index >= 0, layout.to_dense("partial"))
        assert tiles.shape[0] == int((tile_index >= 0).sum())
        bq, bk = _blocks(bs)
        B, H, nq, nk = layout.shape
        rebuilt = torch.zeros(B, H, nq * bq, nk * bk, dtype=torch.bool)
        full = layout.to_dense("full")
        for b, h, i, j in itertools.product(range(B), range(H), range(nq), range(nk)):
            tile = tiles[tile_index[b, h, i, j]] if tile_index[b, h, i, j] >= 0 else full[b, h, i, j]
            rebuilt[b, h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] = tile
        assert torch.equal(rebuilt[..., :sq, :sk], layout.to_dense_elements())
        beyond_the_ends = torch.ones(nq * bq, nk * bk, dtype=torch.bool)
        beyond_the_ends[:sq, :sk] = False
        for b, h, i, j in (tile_index >= 0).nonzero().tolist():
            tile = tiles[tile_index[b, h, i, j]]
            assert not (tile & beyond_the_ends[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]).any()


@pytest.mark.parametrize("axis", ["batch", "nheads"])
def test_a_mask_mod_that_depends_on_a_shared_dim_is_not_broadcast(axis):
    """A mask_mod that depends on h (b) built with the default nheads=1 (batch=1) holds head (row) 0's mask: it is
    recorded, and using the layout for more heads (batch rows), directly or combined with a per-head (per-row)
    layout, is an error naming the argument. One that cannot take index 1 (it reads a one-row tensor) or does
    not depend on it is shared as before."""
    import hf_flash
    sq = sk = 48  # so that |q - kv| is brute_window's offset
    bs = 16
    letter = "h" if axis == "nheads" else "b"
    if axis == "nheads":
        depends = lambda b, h, q, kv: (q - kv).abs() <= 3 + 4 * h
    else:
        depends = lambda b, h, q, kv: (q // (5 + b)) == (kv // 7)
    layout = L.from_mask_mod(depends, sq, sk, bs, device=DEVICE)
    assert layout.depends_on == (axis,) and layout.to(DEVICE).depends_on == (axis,)
    one = torch.zeros(1, sq, 1, 16, device=DEVICE)
    hf_flash.block_sparse_attn_func(one, one, one, layout)  # one head, one row: the mask of h = b = 0 is right
    two = torch.zeros(2, sq, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=f"built with {axis}=1, but its mask_mod depends on {letter}.*{axis}=2"):
        hf_flash.block_sparse_attn_func(two, two, two, layout)
    real = {axis: 2}
    per_dim = L.from_mask_mod(depends, sq, sk, bs, **real, device=DEVICE)
    assert per_dim.depends_on == () and per_dim.shape[0 if axis == "batch" else 1] == 2
    with pytest.raises(ValueError, match=f"depends on {letter} cannot be combined.*{axis}=2"):
        layout | per_dim
    assert (layout | L.local(4, sq, sk, bs, device=DEVICE)).depends_on == (axis,)

    one_row = torch.tensor([5], device=DEVICE)

    def reads_one_row(b, h, q, kv):
        # Out of range here is a device-side assert on the GPU (no IndexError to catch): the probe must stay in range.
        index = h if axis == "nheads" else b
        assert bool(((index >= -1) & (index < 1)).all()), "from_mask_mod called mask_mod with an index past one row"
        return (q - kv).abs() <= one_row[index]
    for shared in (L.from_mask_mod(reads_one_row, sq, sk, bs, device=DEVICE),
                   L.from_mask_mod(lambda b, h, q, kv: (q - kv).abs() <= 5, sq, sk, bs, device=DEVICE)):
        assert shared.depends_on == ()
        check_against(shared, brute_window(sq, sk, 5, 5))


def test_kernel_tensors_follow_in_place_changes():
    """The kernels' block lists are cached on the layout; changing its tensors in place after a call (or
    replacing its mask_mod) rebuilds them rather than running stale lists."""
    sq = sk = 64
    blocks = torch.ones(4, 4, dtype=torch.bool, device=DEVICE)
    layout = L.from_dense(blocks, sq, sk, 16)
    first = layout.kernel_tensors()[0]
    assert layout.kernel_tensors()[0] is first  # cached while nothing changes
    emptied = L.from_dense(torch.zeros_like(blocks), sq, sk, 16)
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        getattr(layout, name).copy_(getattr(emptied, name))
    rebuilt = layout.kernel_tensors()[0]
    assert rebuilt is not first
    assert all(int(t.sum()) == 0 for t in (rebuilt.kv_num_blocks, rebuilt.full_kv_num_blocks, rebuilt.q_num_blocks,
                                           rebuilt.full_q_num_blocks))
    layout.mask_mod = lambda b, h, q, kv: q >= kv
    assert layout.kernel_tensors()[0] is not rebuilt
