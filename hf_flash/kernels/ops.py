"""The torch custom ops around the launchers, with autograd, and run_attention, the one entry the wrappers call.

Under torch.compile the custom ops keep the kernels opaque (no graph break); eagerly, _EagerAttention runs the
same forward and backward without the dispatcher's host cost. Either way the backward is first-order only
(_FirstOrderOnly).
"""

import torch

from .args import AttentionArgs, KernelLayout
from .launch import _features, attention_backward, attention_forward

# Custom ops: opaque to torch.compile (no graph break), with autograd registered, so the same
# function works eagerly, compiled and under activation checkpointing. Their schemas take flat tensors and
# scalars, so AttentionArgs is flattened into them (_fwd_op_args, _bwd_op_args) and rebuilt inside (_op_args).

def _op_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, query_padding_mask,
             alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p, layout_tensors, layout_block_q,
             layout_block_k, deterministic):
    """The AttentionArgs of the custom ops' flat arguments (layout_tensors: KernelLayout's fields; [] when dense)."""
    return AttentionArgs(max_seqlen_q, max_seqlen_k, softmax_scale, cu_seqlens_q=cu_seqlens_q,
                         cu_seqlens_k=cu_seqlens_k, key_padding_mask=key_padding_mask,
                         query_padding_mask=query_padding_mask, alibi_slopes=alibi_slopes, seed=seed,
                         window_left=window_left, window_right=window_right, dropout_p=dropout_p,
                         layout=KernelLayout(*layout_tensors) if layout_tensors else None,
                         layout_block_q=layout_block_q, layout_block_k=layout_block_k, deterministic=deterministic)


def _layout_list(layout):
    return [] if layout is None else list(layout)


def _fwd_op_args(args):
    """args as attention_fwd_op's arguments after q, k, v."""
    return (args.cu_seqlens_q, args.cu_seqlens_k, args.max_seqlen_q, args.max_seqlen_k, args.key_padding_mask,
            args.query_padding_mask, args.alibi_slopes, args.seed, args.softmax_scale, args.window_left,
            args.window_right, args.dropout_p, _layout_list(args.layout), args.layout_block_q, args.layout_block_k,
            args.deterministic)


def _bwd_op_args(args):
    """args as attention_bwd_op's arguments after dout, q, k, v, out, lse, dlse (no query padding mask)."""
    return (args.cu_seqlens_q, args.cu_seqlens_k, args.max_seqlen_q, args.max_seqlen_k, args.key_padding_mask,
            args.alibi_slopes, args.seed, args.softmax_scale, args.window_left, args.window_right, args.dropout_p,
            _layout_list(args.layout), args.layout_block_q, args.layout_block_k, args.deterministic)


@torch.library.custom_op("hf_flash::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                     cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                     key_padding_mask: torch.Tensor | None, query_padding_mask: torch.Tensor | None,
                     alibi_slopes: torch.Tensor | None, seed: torch.Tensor | None, softmax_scale: float,
                     window_left: int, window_right: int, dropout_p: float, layout_tensors: list[torch.Tensor],
                     layout_block_q: int, layout_block_k: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, _op_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               key_padding_mask, query_padding_mask, alibi_slopes, seed, softmax_scale,
                                               window_left, window_right, dropout_p, layout_tensors, layout_block_q,
                                               layout_block_k, deterministic))


@attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, *args):
    lse_shape = (q.shape[-2], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("hf_flash::attention_bwd", mutates_args=())
def attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                     cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                     key_padding_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
                     seed: torch.Tensor | None, softmax_scale: float, window_left: int, window_right: int,
                     dropout_p: float, layout_tensors: list[torch.Tensor], layout_block_q: int,
                     layout_block_k: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, dlse,
                              _op_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, None,
                                       alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p,
                                       layout_tensors, layout_block_q, layout_block_k, deterministic))


@attention_bwd_op.register_fake
def _(dout, q, k, v, *args):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _save(ctx, q, k, v, out, lse, args):
    """Keeps what the backward needs: the tensors through save_for_backward, the rest of args on ctx."""
    # Padding queries need nothing here: their lse is +inf, so the backward gives them zero gradient.
    ctx.save_for_backward(q, k, v, out, lse, args.cu_seqlens_q, args.cu_seqlens_k, args.key_padding_mask,
                          args.alibi_slopes, args.seed, *_layout_list(args.layout))
    ctx.args = args._replace(cu_seqlens_q=None, cu_seqlens_k=None, key_padding_mask=None, query_padding_mask=None,
                             alibi_slopes=None, seed=None, layout=None)


def _saved(ctx):
    """(q, k, v, out, lse, args) as _save kept them."""
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, alibi_slopes, seed, *layout = ctx.saved_tensors
    args = ctx.args._replace(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, key_padding_mask=key_padding_mask,
                             alibi_slopes=alibi_slopes, seed=seed, layout=KernelLayout(*layout) if layout else None)
    return q, k, v, out, lse, args


def _setup_context(ctx, inputs, output):
    q, k, v, *flat = inputs
    _save(ctx, q, k, v, *output, _op_args(*flat))


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, args = _saved(ctx)
    if dout is None:  # only the lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, dlse, *_bwd_op_args(args))
    # Inputs after q, k, v get no gradient; the custom op wants the layout list's as a list of the same length.
    return dq, dk, dv, *([None] * len(a) if isinstance(a, list) else None for a in _fwd_op_args(args))


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward/backward without the custom-op dispatcher, which costs ~100 us of host time
    per call in eager mode (more than the kernels themselves at short lengths). The arguments after
    q, k, v come as one AttentionArgs: apply() inspects each argument it is given, ~1 us apiece. The kernel
    arguments derived from the inputs (_features) are computed once and reused by the backward."""

    @staticmethod
    def forward(ctx, q, k, v, args):
        # An unused lse gets dlse = None instead of a tensor of zeros: no fill kernel, no dlse read.
        ctx.set_materialize_grads(False)
        ctx.features = _features(q, k, args) if q.numel() and k.numel() else None
        # (run_attention applies this Function only with grad mode on, where needs_input_grad means a backward may come)
        out, lse = attention_forward(q, k, v, args, features=ctx.features,
                                     backward_follows=any(ctx.needs_input_grad[:3]))
        _save(ctx, q, k, v, out, lse, args)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, args = _saved(ctx)
        if dout is None:  # only the lse was used (set_materialize_grads(False))
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, dlse, args, features=ctx.features)
        if torch.is_grad_enabled():  # create_graph=True: the gradients must not pass for differentiable ones
            dq, dk, dv = _FirstOrderOnly.apply(dq, dk, dv, q, k, v, dout, dlse)
        return dq, dk, dv, None


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the gradients of a create_graph=True backward, raising if anything differentiates through them.

    The backward kernels are not differentiable: without this, a double backward (a gradient penalty) would
    treat dq, dk, dv as constants and silently drop the second-order term. Raising only when the second
    backward reaches them keeps create_graph=True usable for losses that do not differentiate through attention."""

    @staticmethod
    def forward(ctx, dq, dk, dv, *what_they_depend_on):
        # the inputs they are functions of (q, k, v, dout, dlse) link them into the graph
        return dq, dk, dv

    @staticmethod
    def backward(ctx, *grads_of_grads):
        raise RuntimeError(
            "hf_flash attention is differentiable once: its backward (dq, dk, dv) has no gradient of its own, so a "
            "double backward through it (e.g. a gradient penalty with autograd.grad(..., create_graph=True)) is not "
            "supported. Use attn_implementation=\"eager\" (or \"sdpa\"), or hf_flash.attention_reference, for "
            "that loss.")


def run_attention(q, k, v, args):
    """(out, lse) = run_attention(q, k, v, args: AttentionArgs): the custom op under torch.compile, a plain
    autograd.Function eagerly."""
    if torch.compiler.is_compiling():
        return attention_fwd_op(q, k, v, *_fwd_op_args(args))
    if not torch.is_grad_enabled():  # evaluation: no graph to record, so no autograd node and its host time
        return attention_forward(q, k, v, args)
    return _EagerAttention.apply(q, k, v, args)
