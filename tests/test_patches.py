"""hf_flash.patch / unpatch / patch_transformers on tiny BERT, RoBERTa and GPT-2 models (CPU: the kernels run
under Triton's interpreter, so models are 2 layers of width 32 and tables grow from 16 to 64 positions)."""

import copy
import types

import pytest
import torch
from conftest import DEVICE
from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertModel, GPT2Config, GPT2LMHeadModel,
                          RobertaConfig, RobertaForMaskedLM)

import hf_flash
from hf_flash.patches import extended_table

OLD, NEW = 16, 64  # positions before and after patching
PAD = 1            # RoBERTa's pad_token_id: its positions start at PAD + 1


def tiny(family, attn="hf_triton"):
    common = dict(vocab_size=100, attn_implementation=attn)
    if family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=OLD, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **common)
        return GPT2LMHeadModel(config).to(DEVICE)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    if family == "bert":
        return BertForMaskedLM(BertConfig(max_position_embeddings=OLD, **sizes)).to(DEVICE)
    config = RobertaConfig(max_position_embeddings=OLD + PAD + 1, pad_token_id=PAD, **sizes)
    return RobertaForMaskedLM(config).to(DEVICE)


def table(model):
    return model.get_submodule("transformer.wpe" if model.config.model_type == "gpt2"
                               else "roberta.embeddings.position_embeddings" if model.config.model_type == "roberta"
                               else "bert.embeddings.position_embeddings")


def tokens(length, batch=1):
    return torch.randint(2, 100, (batch, length), device=DEVICE)  # no pad tokens: RoBERTa positions are 2..


def test_copy_and_interpolate_tables():
    weight = torch.arange(10.0).view(5, 2)  # RoBERTa-like: 2 padding rows, then positions 0..2 = rows 2..4
    copied = extended_table(weight, 9, offset=2, init="copy")
    assert torch.equal(copied, torch.cat([weight[:2], weight[2:], weight[2:], weight[2:3]]))
    positions = torch.tensor([[0.0], [10.0], [20.0]])
    stretched = extended_table(positions, 5, init="interpolate")  # 3 rows at 0, 1, 2 -> 5 rows at 0, .5, .., 2
    assert torch.equal(stretched, torch.tensor([[0.0], [5.0], [10.0], [15.0], [20.0]]))


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2"])
def test_patch_keeps_short_inputs_and_runs_4x_longer(family):
    model = tiny(family, attn="eager").eval()
    x = tokens(12, batch=2)
    with torch.no_grad():
        eager = model(x).logits
        patched = hf_flash.patch(copy.deepcopy(model), max_positions=NEW)
        unpatched = copy.deepcopy(model)
        unpatched.set_attn_implementation("hf_triton")
        ours = patched(x).logits
        # Positions within the pretrained length keep their rows: identical to the unpatched model, same attention.
        assert torch.equal(ours, unpatched(x).logits)
    assert patched.config._attn_implementation == "hf_triton"
    torch.testing.assert_close(ours, eager, atol=1e-4, rtol=1e-4)

    offset = PAD + 1 if family == "roberta" else 0
    rows = table(patched).weight
    assert rows.shape == (NEW + offset, 32) and patched.config.max_position_embeddings == NEW + offset
    assert torch.equal(rows[:offset + OLD], table(model).weight)
    if family != "gpt2":
        embeddings = patched.get_submodule(f"{family}.embeddings")
        assert embeddings.position_ids.shape == embeddings.token_type_ids.shape == (1, NEW + offset)
        assert "position_ids" not in patched.state_dict() and "token_type_ids" not in patched.state_dict()

    patched.train()
    patched(tokens(NEW)).logits.sum().backward()
    assert table(patched).weight.grad[offset + OLD:].abs().sum(dim=1).gt(0).all()


def test_interpolate_init_and_tokenizer():
    model = tiny("bert")
    tokenizer = types.SimpleNamespace(model_max_length=OLD)
    old = table(model).weight.detach().clone()
    hf_flash.patch(model, max_positions=NEW, init="interpolate", tokenizer=tokenizer)
    assert torch.equal(table(model).weight, extended_table(old, NEW, init="interpolate"))
    assert torch.equal(table(model).weight[[0, -1]], old[[0, -1]]) and tokenizer.model_max_length == NEW


def test_patch_twice_then_unpatch():
    model = tiny("gpt2", attn="sdpa")
    hf_flash.patch(model, max_positions=NEW)
    weight = table(model).weight
    hf_flash.patch(model, max_positions=NEW)
    assert table(model).weight is weight and model.config._attn_implementation == "hf_triton"
    hf_flash.unpatch(model)
    assert model.config._attn_implementation == "sdpa" and table(model).num_embeddings == NEW  # positions stay
    assert not hasattr(model.config, "attn_implementation")
    hf_flash.unpatch(model)  # harmless too
    assert model.config._attn_implementation == "sdpa"


def test_sparsity_goes_to_the_config():
    model = hf_flash.patch(tiny("bert"), sparsity={"pattern": "local", "block": 16})
    assert model.config._attn_implementation == "hf_triton_sparse"
    assert model.config.hf_flash_sparsity == {"pattern": "local", "block": 16, "window": 1, "global": 0}
    assert torch.isfinite(model(tokens(OLD)).logits).all()
    hf_flash.unpatch(model)
    assert not hasattr(model.config, "hf_flash_sparsity")


def _lora(model, **config):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"], **config))


def _train_one_step(model):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(tokens(NEW)).logits.square().mean().backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("order", ["peft_then_patch", "patch_then_peft", "modules_to_save_then_patch"])
def test_lora_trains_saves_and_reloads_the_new_positions(order, tmp_path):
    """Whichever order PEFT and the patch come in, LoRA trains the rows past the pretrained length, saves them in
    the adapter, and the adapter reloads onto a freshly patched base model with the same outputs."""
    peft = pytest.importorskip("peft")
    base = tiny("bert", attn="sdpa")
    base.save_pretrained(tmp_path / "base")
    if order == "peft_then_patch":
        model = hf_flash.patch(_lora(base), max_positions=NEW)
    elif order == "patch_then_peft":
        model = hf_flash.train_positions(_lora(hf_flash.patch(base, max_positions=NEW)))
    else:
        model = hf_flash.patch(_lora(base, modules_to_save=["position_embeddings"]), max_positions=NEW)
    rows = table(model.get_base_model()).weight  # the adapter's trained copy
    assert rows.requires_grad and rows.shape[0] == NEW
    before = rows.detach().clone()
    frozen = model.get_base_model().bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    _train_one_step(model)
    assert (rows.detach() - before)[OLD:].abs().sum(dim=1).gt(0).all()
    assert torch.equal(model.get_base_model().bert.encoder.layer[0].intermediate.dense.weight, frozen)

    model.save_pretrained(tmp_path / "adapter")
    fresh = hf_flash.patch(BertForMaskedLM.from_pretrained(tmp_path / "base").to(DEVICE), max_positions=NEW)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    x = tokens(2 * OLD)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
        merged = model.merge_and_unload()
        assert torch.equal(table(merged).weight, rows.detach()) and torch.equal(merged(x).logits, model(x).logits)


def test_train_positions_needs_a_peft_model():
    with pytest.raises(TypeError, match="PEFT model"):
        hf_flash.train_positions(tiny("bert"))


def test_save_and_load_round_trip(tmp_path):
    """A saved patched model names no hf_flash attention (it must load where hf_flash is not installed): it reloads
    with transformers' default attention, and with hf_triton when asked for."""
    model = hf_flash.patch(tiny("roberta", attn="sdpa"), max_positions=NEW).eval()
    model.save_pretrained(tmp_path)
    assert "hf_triton" not in (tmp_path / "config.json").read_text().replace(
        '"hf_flash_original_attn_implementation": "sdpa"', "")
    loaded, info = RobertaForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config._attn_implementation == "sdpa"
    assert loaded.config.hf_flash_pretrained_positions == OLD
    assert torch.equal(table(loaded).weight, table(model).weight.cpu())
    ours = RobertaForMaskedLM.from_pretrained(tmp_path, attn_implementation="hf_triton").to(DEVICE).eval()
    assert ours.config._attn_implementation == "hf_triton"
    x = tokens(20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, model(x).logits)
    assert hf_flash.unpatch(ours).config._attn_implementation == "sdpa"


def test_unpatch_after_loading_with_hf_triton(tmp_path):
    """The README's snippet: load with attn_implementation="hf_triton", patch, unpatch -> what the model would have
    had without hf_flash (transformers' default, sdpa), not hf_triton again."""
    tiny("gpt2", attn="sdpa").save_pretrained(tmp_path)
    model = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="hf_triton")
    hf_flash.patch(model, max_positions=NEW)
    assert hf_flash.unpatch(model).config._attn_implementation == "sdpa"
    eager = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager")
    hf_flash.patch(eager)
    hf_flash.patch(eager, max_positions=NEW)  # a second patch keeps the first original
    assert hf_flash.unpatch(eager).config._attn_implementation == "eager"


def test_gradient_checkpointing_gives_the_same_gradients():
    model = hf_flash.patch(tiny("gpt2"), max_positions=NEW).train()
    x = tokens(NEW)
    model(x, labels=x).loss.backward()
    expected = table(model).weight.grad.clone()
    model.zero_grad()
    # transformers 5.23 renamed it (the old name warns); 5.17 has only the old one.
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert model.is_gradient_checkpointing if not hasattr(model, "is_activation_checkpointing") \
        else model.is_activation_checkpointing
    model(x, labels=x).loss.backward()
    torch.testing.assert_close(table(model).weight.grad, expected)


def test_bad_arguments():
    model = tiny("bert")
    with pytest.raises(ValueError, match="smaller than the 16 positions"):
        hf_flash.patch(model, max_positions=8)
    with pytest.raises(ValueError, match="init must be one of"):
        hf_flash.patch(model, max_positions=NEW, init="zeros")
    with pytest.raises(ValueError, match="max_positions must be a positive int"):
        hf_flash.patch(model, max_positions=0)
    with pytest.raises(ValueError, match="pattern"):
        hf_flash.patch(model, sparsity={"pattern": "dense"})
    assert table(model).num_embeddings == OLD and model.config._attn_implementation == "hf_triton"
    other = DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(ValueError, match=r"'distilbert'.*\['bert', 'gpt2', 'roberta'\]"):
        hf_flash.patch(other)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf_flash.patch(torch.nn.Linear(2, 2))


def test_patch_transformers(tmp_path):
    tiny("gpt2", attn="sdpa").save_pretrained(tmp_path)
    hf_flash.patch_transformers(max_positions=NEW)
    try:
        built = tiny("bert", attn=None)
        assert built.config._attn_implementation == "hf_triton" and table(built).num_embeddings == NEW
        assert tiny("bert", attn="eager").config._attn_implementation == "eager"  # an explicit choice wins
        loaded, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"]
        assert loaded.config._attn_implementation == "hf_triton" and table(loaded).num_embeddings == NEW
        assert DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)) \
            .config._attn_implementation != "hf_triton"
    finally:
        hf_flash.unpatch_transformers()
    assert tiny("bert", attn=None).config._attn_implementation != "hf_triton"
