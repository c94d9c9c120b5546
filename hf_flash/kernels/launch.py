"""Host side of a kernel call: the arguments each kernel takes, a short launch path, and the three launchers.

attention_forward runs the forward kernel; attention_backward runs the dQ kernel then the dK/dV kernel. Both
build the kernels' keyword arguments from the tensors (_features, _layout_args, _strides) and launch through
_launch, which remembers the tuner's choice (_CHOSEN) and the compiled kernel (_COMPILED) per launch key so that
a repeated call skips Triton's own launch path. reset_tuning() forgets both. The first forward of a training call
also starts compiling the kernels its backward will launch (_compile_backward_ahead, on ahead.py's threads).

Dense tensors are (batch, seqlen, nheads, headdim); packed (varlen) ones are (total, nheads, headdim) and are
viewed as one batch row whose batch stride is never used. The switches are read as attributes of settings at
each call (settings._ATOMIC_DQ), so that setting one there reaches this module.
"""

import operator
import weakref

import torch
import triton
from triton.runtime.errors import OutOfResources

from . import ahead, choices, settings
from .backward_dkdv import _attn_bwd_dkdv
from .backward_dq import _attn_bwd_dq
from .common import LOG2E
from .dropout import quantised_dropout_p
from .forward import _attn_fwd
from .tuning import _prune

# (kernel, q dtype, tune-key values) -> the Config the autotuner chose for them.
_CHOSEN = {}
# launch key -> (compiled kernel's launcher, function, packed metadata, its (BLOCK_M, BLOCK_N)), see _launch.
_COMPILED = {}
# kernel -> (getter of its non-autotuned arguments from the kwargs, number of leading pointer arguments)
_SIGNATURES = {}


def _meta(kernel):
    """The names of the kernel's autotuned parameters (BLOCK_M, BLOCK_N; QK_ROWS too for dK/dV), last in its
    signature, in signature order."""
    return kernel.arg_names[-len(kernel.configs[0].kwargs):]


_driver = None


def _launch(kernel, rows, block, programs, **kwargs):
    """kernel[grid](**kwargs) on the 1-D grid of cdiv(rows, BLOCK) * programs programs, where BLOCK is the
    config's `block` ("BLOCK_M" or "BLOCK_N"); by a short path after the first call with the same launch key.

    Triton's launch path binds the ~70 arguments by name and specialises each, and the autotuner
    rebuilds dicts of them: ~60 us of host time per launch on an H100 host, more than short and
    block-sparse kernels take on the GPU. What Triton compiles for a call depends on the constexprs,
    the integers (it specialises on divisibility by 16 and on == 1), and the dtype and 16-byte
    alignment of each pointer. The launch key holds all of these (the integers by value; pointer dtypes
    as q's dtype, because every other pointer's dtype is fixed by the callers: int32 lengths and layouts,
    bool masks, fp32 lse and slopes, int64 seed) and the device, so the cached kernel is the one Triton
    would pick, and the call goes straight to its C launcher. Pointers go in as integer addresses: given a tensor, the
    launcher would call data_ptr() and query the driver (cuPointerGetAttribute) for each of ~20 pointers.
    Returns True when the launch key was new (the slow path), else None.
    """
    global _driver
    device = kwargs["Q"].device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        # Triton launches on the current device's stream: a tensor on another GPU (a layer of a model split over
        # GPUs, device_map="auto") would run on the wrong device, unordered with its own stream. ATen's kernels
        # make the tensor's device current (a device guard); so do we.
        with torch.cuda.device(device):
            return _launch(kernel, rows, block, programs, **kwargs)
    key, addresses, scalars = _launch_key(kernel, kwargs)
    entry = _COMPILED.get(key)
    if entry is not None and not _launch_hooks():
        run, function, metadata, meta, size = entry
        grid_x = (rows + size - 1) // size * programs
        run(grid_x, 1, 1, _driver.get_current_stream(_driver.get_current_device()), function, metadata, None, None,
            None, *addresses, *scalars, *meta)
        return None
    grid = _grid(rows, block, programs)
    tune_key = _tune_key(kernel, kwargs)
    config, compiled = _CHOSEN.get(tune_key), None
    with choices.CompileNotice(lambda: choices.describe_call(kernel, kwargs)):
        ahead.wait(key)  # a compile of this launch started ahead (_compile_backward_ahead) is then in Triton's cache
        if config is None and settings.AUTOTUNE and not settings.INTERPRET:
            choices.announce_search()
            compiled = kernel[grid](**kwargs)  # times the candidates, or reads the choice a search saved
            config = _CHOSEN[tune_key] = kernel.best_config
        elif config is None:
            config = choices.choose(kernel, kwargs)
        if compiled is None:  # the config that ran: the chosen one, or the next that fits (_run_fitting)
            compiled, config = _run_fitting(kernel, grid, kwargs, config)
            _CHOSEN[tune_key] = config
    if not settings.INTERPRET:  # the interpreter has no compiled kernel
        if len(_COMPILED) > 4096:  # many distinct lengths (e.g. padded to the batch's longest): start over
            _COMPILED.clear()
        _driver = triton.runtime.driver.active
        _COMPILED[key] = (compiled.run, compiled.function, compiled.packed_metadata,
                          tuple(config.kwargs[name] for name in _meta(kernel)), config.kwargs[block])
    return True


def _grid(rows, block, programs):
    return lambda cfg: (triton.cdiv(rows, cfg[block]) * programs,)


def _tune_key(kernel, kwargs):
    return (kernel, kwargs["Q"].dtype, *(kwargs[name] for name in kernel.keys))


def _run_fitting(kernel, grid, kwargs, config):
    """(compiled kernel, config) of running config, or where it does not fit this GPU, the first of the other
    candidates (tuning._prune's order) that does, announced once per kernel. The rule's order and the shipped tables
    come from GPUs with 227 KB of shared memory per block (H100, H200), so a tile can need more than a GPU with less
    has (A100 163 KB, consumer GPUs ~100 KB). Triton raises before launching, so nothing has run. The search needs
    no such step: Triton's autotuner skips candidates that do not fit."""
    candidates = [config, *(c for c in _prune(kernel.configs, kwargs) if c is not config)]
    for i, candidate in enumerate(candidates):
        try:
            return kernel.fn.run(grid=grid, warmup=False, **kwargs, **candidate.all_kwargs()), candidate
        except OutOfResources as error:
            if i + 1 == len(candidates):
                raise
            choices.say_once(("fit", kernel.base_fn.__name__),
                             f"{choices.describe_call(kernel, kwargs)}: the tile {_describe(candidate)} needs "
                             f"{error.required} of {error.name}, this GPU has {error.limit}; taking the next "
                             "candidate that fits")


def _describe(config):
    return (f"{config.kwargs['BLOCK_M']} x {config.kwargs['BLOCK_N']} ({config.num_warps} warps, "
            f"{config.num_stages} stages)")


def reset_tuning():
    """Forget the autotuned configs and cached launches: the next call of each shape tunes again.

    The tuning key holds lengths, head dim, block sizes and feature flags, not a block-sparse layout's
    contents, so every layout with the same key runs with the config tuned on the first one. A model
    uses one layout and is tuned on it; a benchmark that compares layouts in one process calls this
    between them (each layout then gets what it would get in a process of its own)."""
    ahead.wait_all()
    _CHOSEN.clear()
    _COMPILED.clear()
    for kernel in (_attn_fwd, _attn_bwd_dq, _attn_bwd_dkdv):
        kernel.cache.clear()  # the autotuner's own choices, keyed the same way


def _launch_key(kernel, kwargs):
    """(launch key, pointer addresses, the other non-autotuned arguments in signature order), see _launch."""
    signature = _SIGNATURES.get(kernel)
    if signature is None:  # every kernel takes its pointers first (disabled ones get a dummy tensor)
        names = kernel.arg_names[:-len(_meta(kernel))]
        n_ptr = next(i for i, name in enumerate(names) if not isinstance(kwargs[name], torch.Tensor))
        signature = _SIGNATURES[kernel] = (operator.itemgetter(*names), n_ptr)
    getter, n_ptr = signature
    values = getter(kwargs)
    addresses = [p.data_ptr() for p in values[:n_ptr]]
    scalars = values[n_ptr:]
    q = kwargs["Q"]  # and its device: a compiled kernel's function handle belongs to the device it was loaded on
    return (kernel, q.dtype, q.device.index, scalars, *[a % 16 for a in addresses]), addresses, scalars


def _launch_hooks():
    """Whether a profiler (e.g. proton) has launch hooks registered: then launches take Triton's own path.
    (A chain of hooks, empty by default, in Triton >= 3.5; None or a function before.)"""
    hook = triton.knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def _bucket(n):
    """The power of two >= max(n, 16). (triton.next_power_of_2 is a jit-wrapped function: ~10 us per call.)"""
    return 1 << (max(n, 16) - 1).bit_length()


def _as_4d(x, varlen):
    """A (batch, seqlen, nheads, headdim) view and its strides; packed tensors get batch stride 0."""
    if not varlen:
        return x, x.stride()
    return x.unsqueeze(0), (0, *x.stride())



# (weak reference to the mask, its version, its address, the key range): a model hands the same padding mask to every
# layer of a forward, so the ~8 torch ops of _key_range run once per forward, not once per layer.
_last_key_range = None


def _key_range(key_padding_mask):
    """(batch, 2) int32 [first, last + 1) of the attended keys of each batch row (empty: [0, 0)),
    computed on the device so the kernels can skip the padding blocks without a host sync; the last mask's is
    reused while the mask is unchanged (same tensor, same version counter). Inference tensors have no version
    counter (and may change in place inside inference mode), so theirs is computed each time."""
    global _last_key_range
    kpm = key_padding_mask
    if _last_key_range is not None:
        ref, version, address, key_range = _last_key_range
        if ref() is kpm and not kpm.is_inference() and kpm._version == version and kpm.data_ptr() == address:
            return key_range
    key_range = _compute_key_range(kpm)
    if not kpm.is_inference():
        _last_key_range = (weakref.ref(kpm), kpm._version, kpm.data_ptr(), key_range)
    return key_range


def _compute_key_range(kpm):
    idx = torch.arange(kpm.shape[1], device=kpm.device, dtype=torch.int32)
    first = torch.where(kpm, idx, kpm.shape[1]).amin(1)
    last = torch.where(kpm, idx + 1, 0).amax(1)
    return torch.stack([torch.minimum(first, last), last], 1).to(torch.int32).contiguous()


def _layout_args(q, args):
    """Block-sparse arguments: (for the forward and dQ: key blocks of each query block; for dK/dV: query
    blocks of each key block), from args.layout (a KernelLayout, or None: dense)."""
    layout = args.layout
    if layout is None:
        dummy = dict(LY_NUM=q, LY_IDX=q, LY_FULL_NUM=q, LY_FULL_IDX=q, TILE_IDX=q, TILES=q, RULE=q, ORDER=q, MAJOR=q,
                     ly_sb=0, ly_sh=0, SPARSE=False, HAS_TILES=False, HAS_RULE=False, LAYOUT_BQ=0, LAYOUT_BK=0)
        return dummy, dummy
    batch, heads = layout.kv_num_blocks.shape[:2]  # 1 when the layout is shared (broadcast) over that dim
    common = dict(TILE_IDX=layout.tile_index, TILES=layout.tiles, RULE=layout.rule, ly_sb=heads if batch > 1 else 0,
                  ly_sh=1 if heads > 1 else 0, SPARSE=True, HAS_TILES=layout.tiles.numel() > 0,
                  HAS_RULE=layout.rule.numel() > 0, LAYOUT_BQ=args.layout_block_q, LAYOUT_BK=args.layout_block_k)
    return (dict(LY_NUM=layout.kv_num_blocks, LY_IDX=layout.kv_indices, LY_FULL_NUM=layout.full_kv_num_blocks,
                 LY_FULL_IDX=layout.full_kv_indices, ORDER=layout.q_order, MAJOR=layout.q_major, **common),
            dict(LY_NUM=layout.q_num_blocks, LY_IDX=layout.q_indices, LY_FULL_NUM=layout.full_q_num_blocks,
                 LY_FULL_IDX=layout.full_q_indices, ORDER=layout.k_order, MAJOR=layout.k_major, **common))


def _launch_rows(seqlen, layout_block):
    """Rows the grid covers: block-sparse kernels start a program for every kernel tile of every layout
    block, the last (partial) one's too, because the layout's order maps ranks to whole layout blocks."""
    return -(-seqlen // layout_block) * layout_block if layout_block else seqlen


def _features(q, k, args):
    """(pointers, other arguments, batch) shared by the forward and both backward kernels, from args (AttentionArgs)."""
    varlen = args.cu_seqlens_q is not None
    nheads, head_dim = q.shape[-2], q.shape[-1]
    seq_q = args.max_seqlen_q if varlen else q.shape[1]
    seq_k = args.max_seqlen_k if varlen else k.shape[1]
    dummy = q  # for pointers a disabled feature never reads
    alibi = args.alibi_slopes
    alibi_strides = (0, 0)
    if alibi is not None:
        alibi_strides = (alibi.stride(0), alibi.stride(1)) if alibi.dim() == 2 else (0, alibi.stride(0))
    kpm = args.key_padding_mask
    # lse and delta: (batch, nheads, seqlen_q), or (nheads, total_q) for packed sequences
    lse_strides = (0, q.shape[0]) if varlen else (nheads * seq_q, seq_q)
    ptrs = dict(CU_Q=args.cu_seqlens_q if varlen else dummy, CU_K=args.cu_seqlens_k if varlen else dummy,
                KPM=kpm if kpm is not None else dummy,
                K_RANGE=_key_range(kpm) if kpm is not None else dummy,
                ALIBI=alibi if alibi is not None else dummy, SEED=args.seed if args.seed is not None else dummy)
    shared = dict(
        stride_lb=lse_strides[0], stride_lh=lse_strides[1], stride_kpm=kpm.stride(0) if kpm is not None else 0,
        stride_ab=alibi_strides[0], stride_ah=alibi_strides[1],
        NHEADS=nheads, GROUP=nheads // k.shape[-2], SEQ_Q=seq_q, SEQ_K=seq_k,
        qk_scale=args.softmax_scale * LOG2E.value, win_left=args.window_left, win_right=args.window_right,
        dropout_p=quantised_dropout_p(args.dropout_p),
        SEQ_Q_BUCKET=_bucket(seq_q), SEQ_K_BUCKET=_bucket(seq_k),
        HEAD_DIM=head_dim, BLOCK_D=_bucket(head_dim), IS_VARLEN=varlen,
        HAS_LEFT=args.window_left >= 0, HAS_RIGHT=args.window_right >= 0, HAS_KPM=kpm is not None,
        HAS_ALIBI=alibi is not None, DROPOUT=args.dropout_p > 0.0,
        # fp32 inputs get true fp32 dots: tf32 would be ~1e-3 off, far from PyTorch's fp32 result.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=bool(settings.INTERPRET),
    )
    batch = args.cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    return ptrs, shared, batch


def attention_forward(q, k, v, args, features=None, backward_follows=False):
    """Returns out (shape of q, contiguous) and lse: (batch, nheads, seqlen_q), or (nheads, total_q) packed.
    args: AttentionArgs. features: _features() of these arguments, when the caller already has them (the eager
    path keeps them for the backward). backward_follows: a backward is expected (inputs that need gradients), so the
    first call of a new variant starts compiling the backward kernels (_compile_backward_ahead)."""
    varlen = args.cu_seqlens_q is not None
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    nheads = q.shape[-2]
    lse_shape = (nheads, q.shape[0]) if varlen else (q.shape[0], nheads, q.shape[1])
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if k.numel() == 0:  # no keys at all: every row is empty
        return out.zero_(), lse.fill_(float("inf"))
    ptrs, shared, batch = features or _features(q, k, args)
    qpm = args.query_padding_mask
    (q4, qs), (k4, ks), (v4, vs), (o4, os_) = (_as_4d(t, varlen) for t in (q, k, v, out))
    layout_kv, _ = _layout_args(q, args)
    new = _launch(_attn_fwd, _launch_rows(shared["SEQ_Q"], args.layout_block_q), "BLOCK_M", batch * nheads,
                  Q=q4, K=k4, V=v4, O=o4, LSE=lse, **ptrs, **layout_kv, QPM=qpm if qpm is not None else q,
                  stride_qpm=qpm.stride(0) if qpm is not None else 0, HAS_QPM=qpm is not None,
                  **_strides("q", qs), **_strides("k", ks), **_strides("v", vs), **_strides("o", os_), **shared)
    if new and backward_follows and _compiles_ahead():
        _compile_backward_ahead(q, k, v, out, lse, args, (ptrs, shared, batch))
    return out, lse


def _compiles_ahead():
    """Not under the search (HF_FLASH_AUTOTUNE=1), which compiles every candidate as it times them, nor under the
    interpreter, which compiles nothing."""
    return not settings.AUTOTUNE and not settings.INTERPRET


def _compile_backward_ahead(q, k, v, out, lse, args, features):
    """Starts compiling, on worker threads (ahead.py), the dQ and dK/dV kernels that the backward of this call will
    launch for a dout laid out like out (contiguous, as transformers' models give it) and no lse gradient: the tile
    it will pick and every argument Triton specialises on. out and lse stand in for the buffers the backward
    allocates (same dtypes, fresh allocations alike in alignment). A backward that differs (another dout layout)
    compiles its own variant, as it would without this."""
    dq_acc = lse if _atomic_dq(q, args, features[1]) else None
    for kernel, rows, block, programs, kwargs in _backward_launches(out, q, k, v, out, lse, None, args, features,
                                                                    out, out, out, lse, dq_acc):
        key = _launch_key(kernel, kwargs)[0]
        if key not in _COMPILED:
            ahead.submit(key, lambda kernel=kernel, rows=rows, block=block, programs=programs, kwargs=kwargs:
                         _compile(kernel, rows, block, programs, kwargs))


def _compile(kernel, rows, block, programs, kwargs):
    """Compiles and loads the kernel for these arguments with the config _launch would pick, without launching it."""
    with torch.cuda.device(kwargs["Q"].device):
        config = _CHOSEN.get(_tune_key(kernel, kwargs)) or choices.choose(kernel, kwargs)
        compiled = kernel.fn.run(grid=_grid(rows, block, programs), warmup=True, **kwargs, **config.all_kwargs())
        compiled.run  # noqa: B018 (the property builds the C launcher and loads the binary, as a first launch does)


_STRIDE_NAMES = {name: tuple(f"stride_{name}{axis}" for axis in ("b", "m" if name in ("q", "o", "do", "dq") else "n", "h", "d"))
                 for name in ("q", "k", "v", "o", "do", "dq", "dk", "dv")}


def _strides(name, strides):
    return dict(zip(_STRIDE_NAMES[name], strides))


def attention_backward(dout, q, k, v, out, lse, dlse, args, features=None):
    """Returns dq, dk, dv (contiguous, in the input dtypes). dlse may be None. args, features: as in
    attention_forward. args.deterministic: never sum dQ with atomics (see settings._ATOMIC_DQ);
    torch.use_deterministic_algorithms(True) too."""
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    features = features or _features(q, k, args)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    atomic = _atomic_dq(q, args, features[1])
    # dQ first, which also stores delta for the dK/dV kernel; with atomics only delta, and the dK/dV kernel
    # adds each key block's dQ into an fp32 buffer that this launch zeroes (the dropout mask is then drawn once)
    delta = torch.empty_like(lse)
    dq_acc = torch.empty(q.shape, device=q.device, dtype=torch.float32) if atomic else None
    for kernel, rows, block, programs, kwargs in _backward_launches(dout, q, k, v, out, lse, dlse, args, features,
                                                                    dq, dk, dv, delta, dq_acc):
        _launch(kernel, rows, block, programs, **kwargs)
    if atomic:
        dq.copy_(dq_acc)
    return dq, dk, dv


def _atomic_dq(q, args, shared):
    """Whether the dK/dV kernel sums dQ with fp32 atomics (settings._ATOMIC_DQ) instead of a dQ kernel of its own."""
    deterministic = args.deterministic or torch.are_deterministic_algorithms_enabled()
    # Atomics only where measured (rows up to 256 bytes: head dim 128 in 16 bits): beyond, the dK/dV kernel's fp32
    # dQ tile does not fit shared memory next to its other buffers in the first 64 x 64 candidate (Triton 3.6).
    return not deterministic and q.element_size() * shared["BLOCK_D"] <= 256 and (
        settings._ATOMIC_DQ == "1" or (settings._ATOMIC_DQ == "dropout" and args.dropout_p > 0.0))


def _backward_launches(dout, q, k, v, out, lse, dlse, args, features, dq, dk, dv, delta, dq_acc):
    """[(kernel, rows, block, programs, kwargs)] of the dQ and dK/dV launches, as _launch takes them. dq, dk, dv
    (and dq_acc, fp32, when dQ is summed with atomics; else None) are the contiguous buffers attention_backward
    allocates: their strides come from the shapes of q and k, so any tensor of their dtype and alignment can stand in
    for them (_compile_backward_ahead)."""
    varlen = args.cu_seqlens_q is not None
    ptrs, shared, batch = features
    nheads, nheads_kv = q.shape[-2], k.shape[-2]
    (q4, qs), (k4, ks), (v4, vs), (o4, os_), (do4, dos) = (_as_4d(t, varlen) for t in (q, k, v, out, dout))
    dqs, dks = _contiguous_strides(q.shape, varlen), _contiguous_strides(k.shape, varlen)
    dq4, dk4, dv4 = (_as_4d(t, varlen)[0] for t in (dq, dk, dv))
    atomic = dq_acc is not None
    dq_acc4, dq_accs = (_as_4d(dq_acc, varlen)[0], dqs) if atomic else (_no_buffer(q.device), (0, 0, 0, 0))
    scales = dict(sm_scale=args.softmax_scale)
    kv_ptrs = {name: ptrs[name] for name in ("CU_Q", "CU_K", "KPM", "ALIBI", "SEED")}
    layout_kv, layout_q = _layout_args(q, args)
    dq_launch = dict(
        Q=q4, K=k4, V=v4, O=o4, DO=do4, LSE=lse, DLSE=dlse if dlse is not None else lse, Delta=delta,
        DQ=dq_acc4 if atomic else dq4, **kv_ptrs, **layout_kv, K_RANGE=ptrs["K_RANGE"], HAS_DLSE=dlse is not None,
        DELTA_ONLY=atomic, **_strides("q", qs), **_strides("k", ks), **_strides("v", vs), **_strides("o", os_),
        **_strides("do", dos), **_strides("dq", dq_accs if atomic else dqs), **scales, **shared)
    dkdv_launch = dict(
        Q=q4, K=k4, V=v4, DO=do4, LSE=lse, Delta=delta, DK=dk4, DV=dv4, DQ=dq_acc4, **kv_ptrs, **layout_q,
        **_strides("q", qs), **_strides("k", ks), **_strides("v", vs), **_strides("do", dos), **_strides("dk", dks),
        **_strides("dv", dks), **_strides("dq", dq_accs), ATOMIC_DQ=atomic, **scales, **shared)
    return [(_attn_bwd_dq, _launch_rows(shared["SEQ_Q"], args.layout_block_q), "BLOCK_M", batch * nheads, dq_launch),
            (_attn_bwd_dkdv, _launch_rows(shared["SEQ_K"], args.layout_block_k), "BLOCK_N", batch * nheads_kv,
             dkdv_launch)]


def _contiguous_strides(shape, varlen):
    """The strides _as_4d gives a contiguous tensor of this shape."""
    strides, size = [], 1
    for n in reversed(shape):
        strides.append(size)
        size *= n
    strides.reverse()
    return (0, *strides) if varlen else tuple(strides)


_NO_BUFFER = {}


def _no_buffer(device):
    """A one-element fp32 tensor on device, private to this module, for the dK/dV kernel's DQ when it does not
    accumulate dQ (never read then; the tuner zeroes it)."""
    buffer = _NO_BUFFER.get(device)
    if buffer is None:
        buffer = _NO_BUFFER[device] = torch.zeros(1, device=device, dtype=torch.float32)
    return buffer
