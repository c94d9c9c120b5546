"""The torch custom ops around the launchers, with autograd, and run_attention, the one entry the wrappers call.

Under torch.compile the custom ops keep the kernels opaque (no graph break); eagerly, _EagerAttention runs the
same forward and backward without the dispatcher's host cost. Either way the backward is first-order only
(_FirstOrderOnly).
"""

import torch

from .launch import _features, attention_backward, attention_forward

# Custom ops: opaque to torch.compile (no graph break), with autograd registered, so the same
# function works eagerly, compiled and under activation checkpointing.

@torch.library.custom_op("hf_flash::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                     cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                     key_padding_mask: torch.Tensor | None, query_padding_mask: torch.Tensor | None,
                     alibi_slopes: torch.Tensor | None, seed: torch.Tensor | None, softmax_scale: float,
                     window_left: int, window_right: int, dropout_p: float, layout_tensors: list[torch.Tensor],
                     layout_block_q: int, layout_block_k: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask,
                             query_padding_mask, alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p,
                             layout_tensors, layout_block_q, layout_block_k)


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
    return attention_backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              key_padding_mask, alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p,
                              layout_tensors, layout_block_q, layout_block_k, deterministic)


@attention_bwd_op.register_fake
def _(dout, q, k, v, *args):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, _query_padding_mask,
     alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p, layout_tensors, layout_block_q,
     layout_block_k, deterministic) = inputs
    out, lse = output
    # Padding queries need nothing here: their lse is +inf, so the backward gives them zero gradient.
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, alibi_slopes, seed,
                          *layout_tensors)
    ctx.config = (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, dropout_p,
                  layout_block_q, layout_block_k, deterministic)
    ctx.n_inputs = len(inputs)


def _backward(ctx, dout, dlse, backward_fn=attention_bwd_op, **extra):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, alibi_slopes, seed, *layout = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, dropout_p, layout_block_q, layout_block_k,
     deterministic) = ctx.config
    if dout is None:  # only the lse was used (the eager path does not materialise zero gradients)
        dout = torch.zeros_like(out)
    dq, dk, dv = backward_fn(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, key_padding_mask, alibi_slopes, seed, softmax_scale,
                             window_left, window_right, dropout_p, layout,
                             layout_block_q, layout_block_k, deterministic, **extra)
    # Inputs after q, k, v get no gradient; the custom op wants the layout list's as a list of the same length.
    grads = [None] * (ctx.n_inputs - 3)
    if backward_fn is attention_bwd_op:
        grads[-4] = [None] * len(layout)
    return dq, dk, dv, *grads


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward/backward without the custom-op dispatcher, which costs ~100 us of host time
    per call in eager mode (more than the kernels themselves at short lengths). The arguments after
    q, k, v come as one tuple: apply() inspects each argument it is given, ~1 us apiece. The kernel
    arguments derived from the inputs (_features) are computed once and reused by the backward."""

    @staticmethod
    def forward(ctx, q, k, v, rest):
        # An unused lse gets dlse = None instead of a tensor of zeros: no fill kernel, no dlse read.
        ctx.set_materialize_grads(False)
        # rest: cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, (query_padding_mask,)
        # alibi_slopes, seed, softmax_scale, window_left, window_right, dropout_p, (layout...)
        ctx.features = _features(q, k, *rest[:5], *rest[6:12]) if q.numel() and k.numel() else None
        inputs = (q, k, v, *rest)
        out, lse = attention_forward(*inputs, features=ctx.features)
        _setup_context(ctx, inputs, (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv, *_ = _backward(ctx, dout, dlse, backward_fn=attention_backward, features=ctx.features)
        if torch.is_grad_enabled():  # create_graph=True: the gradients must not pass for differentiable ones
            q, k, v = ctx.saved_tensors[:3]
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


def run_attention(*inputs):
    """(out, lse) = run_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    key_padding_mask, query_padding_mask, alibi_slopes, seed, softmax_scale, window_left,
    window_right, dropout_p, layout_tensors, layout_block_q, layout_block_k, deterministic): the custom op under
    torch.compile, a plain autograd.Function eagerly. layout_tensors is [] for dense attention."""
    if torch.compiler.is_compiling():
        return attention_fwd_op(*inputs)
    q, k, v, *rest = inputs
    return _EagerAttention.apply(q, k, v, rest)
