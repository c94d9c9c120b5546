"""Long-document classification with a BERT-family encoder, hf_flash attention and Accelerate.

    accelerate launch examples/finetune_classification.py                       # built-in task, tiny model
    accelerate launch examples/finetune_classification.py --model bert-base-uncased --max-length 4096 \\
        --mixed-precision bf16 --gradient-checkpointing                        # position table extended to 4096
    python examples/finetune_classification.py --model my-bert --train-file docs.jsonl   # {"text", "label"} rows

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

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import BOS, EOS, EVIDENCE_A, FIRST_FREE, SYNTH_VOCAB  # noqa: E402


EVIDENCE_SPACING = 36  # built-in task: default evidence tokens, one per 36 positions of [H, doc_length)


class Task:
    name = "finetune_classification"

    def __init__(self, max_length, evidence=None, doc_length=None):
        doc_length = doc_length or max_length
        self.horizon = max(1, min(512, doc_length // 2))
        evidence = evidence or max(7, (doc_length - self.horizon) // EVIDENCE_SPACING)
        if doc_length - 1 - self.horizon < evidence:
            raise SystemExit(f"--doc-length {doc_length} is too short for {evidence} evidence tokens")
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


def build_model(args, num_labels, tokenizer):
    from transformers import AutoModelForSequenceClassification, BertConfig
    if args.model is None:
        config = BertConfig(vocab_size=SYNTH_VOCAB, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size,
                            max_position_embeddings=args.max_length, num_labels=num_labels, pad_token_id=0,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return AutoModelForSequenceClassification.from_config(config, attn_implementation=args.attn)
    return common.load_pretrained(AutoModelForSequenceClassification, args, tokenizer, num_labels=num_labels)


def main(argv=None):
    parser = common.build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--evidence", type=int, default=None,
                        help=f"built-in task: evidence tokens per document; None: one per {EVIDENCE_SPACING} positions "
                             f"after the first min(512, doc length // 2), at least 7 (99 at 4096)")
    parser.add_argument("--doc-length", type=int, default=None,
                        help="built-in task: document length (default --max-length); longer documents are truncated "
                             "to --max-length, e.g. --doc-length 4096 --max-length 512 for the truncated baseline")
    args = parser.parse_args(common.argv_or_sys(argv))
    gpu = common.resolve_defaults(args, Task.name)
    accelerator = common.make_accelerator(args, gpu)
    task = Task(args.max_length, args.evidence, args.doc_length)

    tokenizer, train_set, eval_set, num_labels = common.load_data(args, task, causal_lm=False)
    num_labels = num_labels or 2  # the built-in task is binary
    with accelerator.main_process_first():
        model = build_model(args, num_labels, tokenizer)
    model = common.setup_model(model, args, tokenizer, "SEQ_CLS", accelerator)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else common.PAD
    return common.train(args, task, model, tokenizer, train_set, eval_set, pad_id, accelerator)


if __name__ == "__main__":
    main()
