"""Jit helpers every kernel uses: interpreter-safe casts and dot operands, row loads, and the order of tiles.

A program's tile comes from a 1-D grid (_tile, _n_tiles, _sparse_tile), its sequence from cu_seqlens when packed
(_seq_bounds), and each loop position from a token range or a block-sparse index list (_block_start).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _mm(x, INTERPRET: tl.constexpr):
    # The interpreter's tl.dot multiplies the raw bit patterns of bf16 operands: upcast there.
    if INTERPRET:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    # The interpreter truncates fp32 -> bf16, which biases every rounded probability downwards;
    # round to nearest even there, as the GPU does.
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _pin_fp32(x, INTERPRET: tl.constexpr):
    """x, through an identity LLVM cannot see into. Put after tl.where(c, x, 0.0) when x is cast to fp16/bf16
    next, it keeps the select on the fp32 values: LLVM otherwise moves it past the cast, where each pair of values
    costs an unpack, two selects and a repack (PRMT, SEL, SEL, PRMT) instead of two FSEL (Triton 3.6, sm_90)."""
    if INTERPRET:
        return x
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero-filling rows >= n_rows (if checked) and the padded head dim."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _tile(n_blocks, MAJOR, REVERSE: tl.constexpr, SPARSE: tl.constexpr):
    """(rank of the block along the sequence, batch * nheads index) of this program.

    The grid is 1-D because CUDA caps grid axis 1 at 65535, below batch * nheads for large batches
    of short sequences. Head-major: consecutive programs share a head, so its K/V stay in L2. With
    REVERSE (dense causal, where later query blocks do more work) the heaviest blocks start first.
    Block-sparse kernels rank blocks by work (_sparse_tile) and go block-major (consecutive programs
    take the same rank in every head) when the layout says so (MAJOR, kernel_tensors' q/k_major): when
    a few rows are far longer than the rest (global tokens), so that those of every head start in the
    first wave instead of one head's at a time, the last head's in the last wave.
    """
    pid = tl.program_id(0)
    block, head = pid % n_blocks, pid // n_blocks
    if SPARSE:
        if tl.load(MAJOR) != 0:
            n_heads = tl.num_programs(0) // n_blocks
            block, head = pid // n_heads, pid % n_heads
    elif REVERSE:
        block = n_blocks - 1 - block
    return block, head


@triton.jit
def _n_tiles(seqlen, BLOCK: tl.constexpr, SPARSE: tl.constexpr, LAYOUT_BLOCK: tl.constexpr):
    """Tiles along the sequence; block-sparse: every layout block's, the last one's too (see _launch_rows)."""
    if SPARSE:
        return tl.cdiv(seqlen, LAYOUT_BLOCK) * (LAYOUT_BLOCK // BLOCK)
    else:
        return tl.cdiv(seqlen, BLOCK)


@triton.jit
def _sparse_tile(rank, ORDER, ly_bh, seqlen, LAYOUT_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                 SPARSE: tl.constexpr):
    """The kernel tile that runs at `rank`. Block-sparse: a tile of the rank-th layout block by descending
    work (kernel_tensors' q_order / k_order; a layout block holds LAYOUT_BLOCK // BLOCK kernel tiles), so
    that long rows never start in the last wave."""
    if SPARSE:
        return (tl.load(ORDER + ly_bh * tl.cdiv(seqlen, LAYOUT_BLOCK) + rank // (LAYOUT_BLOCK // BLOCK))
                * (LAYOUT_BLOCK // BLOCK) + rank % (LAYOUT_BLOCK // BLOCK))
    else:
        return rank


@triton.jit
def _seq_bounds(CU_SEQLENS, off_b, SEQ, IS_VARLEN: tl.constexpr):
    """(start row, length) of sequence off_b: packed (varlen) sequences read them from cu_seqlens."""
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + off_b)
        return start.to(tl.int64), tl.load(CU_SEQLENS + off_b + 1) - start
    else:
        return 0, SEQ + 0



@triton.jit
def _block_start(it, idx_ptr, SPARSE: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """First token of the tile that loop position `it` (a multiple of BLOCK) visits.

    Dense loops walk a token range, so that is `it` itself. Block-sparse loops walk a layout's index
    list instead: position it // BLOCK is the (it // BLOCK) % (LAYOUT_BLOCK // BLOCK)-th kernel tile of
    listed layout block (it // BLOCK) // (LAYOUT_BLOCK // BLOCK). This is the only difference between
    the dense and the block-sparse loops.
    """
    if SPARSE:
        tiles_per_block: tl.constexpr = LAYOUT_BLOCK // BLOCK
        j = it // BLOCK
        return tl.load(idx_ptr + j // tiles_per_block) * LAYOUT_BLOCK + (j % tiles_per_block) * BLOCK
    else:
        return it
