"""Causal language modelling with a GPT-2-family decoder on long contexts, hf_flash attention and Accelerate.

    accelerate launch examples/finetune_lm.py                                    # built-in task, tiny model
    accelerate launch examples/finetune_lm.py --model gpt2 --max-length 8192 \\
        --gradient-checkpointing --lora          # position table extended to 8192 and trained with the adapter
    python examples/finetune_lm.py --model my-gpt2 --train-file corpus.jsonl     # {"text"} rows, loss on all tokens

Built-in task ("key-value retrieval"): after BOS, a body of random filler tokens holds key-value pairs (a key
token directly followed by its value token; distinct keys per sequence) at random places; the sequence ends with
`--queries` queries "QUERY key value" (`--pairs` pairs in all; by default only the queried ones, more add
distractors). The loss is taken only on the queried values, and every queried pair lies in
the first half of the body, so the answer is always at least a quarter of the sequence away from its query and
a model that sees only the last half of the context is at chance (1 / number of values). Evaluation reports the
answer accuracy and the perplexity of the answer tokens.
"""

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import options  # noqa: E402
from common import BOS, EOS, FIRST_FREE, QUERY, SYNTH_VOCAB  # noqa: E402

N_KEYS, N_VALUES = 64, 32
KEYS = FIRST_FREE                 # key tokens: KEYS .. KEYS + N_KEYS - 1
VALUES = KEYS + N_KEYS            # value tokens: VALUES .. VALUES + N_VALUES - 1
FILLER = VALUES + N_VALUES        # filler tokens: FILLER .. SYNTH_VOCAB - 1
BUILTIN_NAME = "built-in config (from scratch)"  # the summary's "model" for the built-in config
# Retrieval is learnt later than the classification task's counting: more steps on the CPU, a higher rate.
DEFAULTS = {
    "gpu": dict(model=common.BUILTIN, max_length=4096, hidden_size=256, layers=4, heads=4, steps=400,
                mixed_precision="bf16"),
    "cpu": dict(model=common.BUILTIN, max_length=256, hidden_size=64, layers=2, heads=2, steps=500,
                mixed_precision="no"),
}


class Task:
    name = "finetune_lm"
    chance_accuracy = 1 / N_VALUES  # a uniform guess among the values

    def __init__(self, max_length, queries, pairs):
        self.max_length, self.queries = max_length, queries
        self.body = max_length - 2 - 3 * queries             # BOS, body, queries, EOS
        slots = self.body // 2                                # a pair fills one 2-token slot
        self.pairs = min(pairs or queries, N_KEYS, slots)
        if self.body < 8 or slots // 2 < queries or self.pairs < queries:
            common.fail(f"--max-length {max_length} is too short for --queries {queries}")

    def make(self, rng):
        """One example: input_ids (max_length,), labels (max_length,) = the answer ids, -100 elsewhere."""
        slots = self.body // 2
        early = rng.choice(slots // 2, size=self.queries, replace=False)            # the queried pairs
        rest = np.setdiff1d(np.arange(slots), early)
        others = rng.choice(rest, size=self.pairs - self.queries, replace=False)
        keys = KEYS + rng.choice(N_KEYS, size=self.pairs, replace=False)
        values = VALUES + rng.integers(N_VALUES, size=self.pairs)
        body = rng.integers(FILLER, SYNTH_VOCAB, size=self.body)
        starts = 2 * np.concatenate([early, others])
        body[starts], body[starts + 1] = keys, values
        order = rng.permutation(self.queries)
        tail = np.stack([np.full(self.queries, QUERY), keys[order], values[order]], axis=1).reshape(-1)
        ids = np.concatenate([[BOS], body, tail, [EOS]])
        labels = np.full_like(ids, -100)
        answers = 1 + self.body + 3 * np.arange(self.queries) + 2
        labels[answers] = ids[answers]
        return {"input_ids": ids, "labels": labels}

    @staticmethod
    def evaluate(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        scored = labels != -100
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
        correct = (logits.argmax(-1) == labels) & scored
        return {"loss": loss.sum(1), "correct": correct.sum(1).float(), "count": scored.sum(1).float()}

    @staticmethod
    def finish_eval(sums):
        loss = sums["loss"] / sums["count"]
        return {"accuracy": sums["correct"] / sums["count"], "loss": loss, "perplexity": float(np.exp(min(loss, 50)))}

    @staticmethod
    def shown(entry):
        """The latest evaluation, for the progress bar."""
        return {"eval_ppl": f"{entry['eval_perplexity']:.2f}", "eval_acc": f"{entry['eval_accuracy']:.3f}"}

    def verdict(self, summary):
        last = summary["eval"]
        if summary["data"] != "built-in task":
            scope = "on every token of the text"
        else:
            scope = (f"on the built-in task the answers are scored: chance is {self.chance_accuracy:.1%} accuracy, "
                     f"perplexity {N_VALUES} for a uniform guess among the values")
        line = f"eval perplexity {last['eval_perplexity']:.2f}, accuracy {last['eval_accuracy']:.1%} ({scope})"
        if summary["data"] == "built-in task" and summary["device"] == "cpu" and summary["model"] == BUILTIN_NAME:
            line += ("\nThe CPU default is a smoke run: a 2-layer model learns retrieval slowly, so its accuracy ends "
                     "a few times chance, far from 100% (one run of the defaults: 13.5% after 500 steps).")
        return line


def build_model(args, num_labels, tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config
    if args.model is None:
        config = GPT2Config(vocab_size=SYNTH_VOCAB, n_positions=args.max_length, n_embd=args.hidden_size,
                            n_layer=args.layers, n_head=args.heads, bos_token_id=BOS, eos_token_id=EOS,
                            pad_token_id=common.PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn)
    else:
        model = common.load_pretrained(AutoModelForCausalLM, args, tokenizer)
    if getattr(model, "loss_type", "") is None:  # GPT2LMHeadModel's name maps to no loss: say which, quietly
        model.loss_type = "ForCausalLM"
    return model


def main(argv=None):
    started = time.time()
    parser = common.build_parser(__doc__.split("\n\n")[0], DEFAULTS,
                                 lr_help="peak learning rate (default: 2e-3 for the built-in model, 5e-5 pretrained, "
                                         "5e-4 with --lora)")
    task = parser.add_argument_group("built-in task")
    task.add_argument("--queries", type=options.positive_int, default=4,
                        help="built-in task: queries (answers) per sequence")
    task.add_argument("--pairs", type=options.positive_int, default=None,
                        help="built-in task: key-value pairs per sequence, from --queries to 64; more pairs are "
                             "distractors, a harder task (default: --queries)")
    args = parser.parse_args(common.argv_or_sys(argv))
    gpu = common.resolve_defaults(args, Task.name, DEFAULTS,
                                  lr_for=lambda a: 5e-4 if a.lora else (2e-3 if a.model is None else 5e-5))
    task = Task(args.max_length, args.queries, args.pairs)
    return common.run_job(args, gpu, task, build_model, "CAUSAL_LM", causal_lm=True, started=started)


if __name__ == "__main__":
    main()
