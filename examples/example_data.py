"""Data for the fine-tuning scripts: the built-in synthetic tasks' plumbing, the user's jsonl files (checked line by
line before any training), batching, and the epoch-seeded shuffle that makes a resumed run see the same batches.

Built-in data (no download, no tokenizer): token ids are generated directly over a 512-token synthetic vocabulary,
deterministically from (seed, split, index). With `--model` the synthetic ids are mapped one-to-one onto ordinary
ids of that model's tokenizer (`TokenMap`), so the same tasks run on a pretrained BERT / GPT-2.
"""

import json

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from options import fail

# Synthetic vocabulary: a few markers, then task-specific ranges (see the scripts), then filler.
SYNTH_VOCAB = 512
PAD, BOS, EOS, QUERY, EVIDENCE_A, EVIDENCE_B = 0, 1, 2, 3, 4, 5
FIRST_FREE = 16


def example_rng(seed, split, index):
    """Each example from its own generator: deterministic, independent of workers and of access order."""
    return np.random.default_rng([seed, {"train": 0, "eval": 1}[split], index])


class SyntheticDataset(Dataset):
    """`make(rng) -> dict of int lists` called per index; ids mapped through `token_map` when a tokenizer is used."""

    def __init__(self, make, size, seed, split, token_map=None):
        self.make, self.size, self.seed, self.split, self.token_map = make, size, seed, split, token_map

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        item = self.make(example_rng(self.seed, self.split, index))
        if self.token_map is not None:
            item["input_ids"] = self.token_map(item["input_ids"])
            if "labels" in item and isinstance(item["labels"], np.ndarray):
                answer = item["labels"] != -100
                item["labels"] = np.where(answer, item["input_ids"], -100)
        return {k: torch.as_tensor(v) for k, v in item.items()}


class TokenMap:
    """Maps the synthetic vocabulary one-to-one onto a real tokenizer: the markers onto its special tokens where it
    has them, every other synthetic id onto a distinct ordinary token chosen with a fixed seed. Sequence lengths
    stay exactly what the generator made (no re-tokenization)."""

    def __init__(self, tokenizer, seed=0):
        special = set(tokenizer.all_special_ids)
        ordinary = np.array([i for i in range(len(tokenizer)) if i not in special])
        if len(ordinary) < SYNTH_VOCAB:
            fail(f"--model: its tokenizer has {len(ordinary)} ordinary tokens; the built-in tasks need {SYNTH_VOCAB} "
                 f"(or give --train-file)")
        table = np.random.default_rng(seed).choice(ordinary, SYNTH_VOCAB, replace=False)
        first = lambda *ids: next((i for i in ids if i is not None), None)  # noqa: E731
        for synthetic, real in ((PAD, tokenizer.pad_token_id),
                                (BOS, first(tokenizer.cls_token_id, tokenizer.bos_token_id)),
                                (EOS, first(tokenizer.sep_token_id, tokenizer.eos_token_id))):
            if real is not None:
                table[synthetic] = real
        self.table = table

    def __call__(self, ids):
        return self.table[np.asarray(ids)]


# ---------------------------------------------------------------------------------------------
# User data: jsonl
# ---------------------------------------------------------------------------------------------

def _kind(value):
    return "an integer" if isinstance(value, int) else "a string" if isinstance(value, str) else type(value).__name__


def read_jsonl(path, need_label):
    """[(line number, text, label or None)] from a jsonl file; any problem ends the run naming `path:line`."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    fail(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno}); expected one "
                         f"object per line")
                if not isinstance(row, dict):
                    fail(f"{path}:{number}: expected a JSON object with a \"text\" field, got {_kind(row)}")
                if "text" not in row or not isinstance(row["text"], str):
                    fail(f"{path}:{number}: expected a string \"text\" field, "
                         + ("found none" if "text" not in row else f"got {_kind(row['text'])}"))
                label = row.get("label")
                if need_label and (label is None or isinstance(label, bool) or not isinstance(label, (int, str))):
                    fail(f"{path}:{number}: expected a \"label\" field, an integer or a string, "
                         + ("found none" if label is None else f"got {json.dumps(label)}"))
                rows.append((number, row["text"], label if need_label else None))
    except UnicodeDecodeError as error:
        fail(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})")
    if not rows:
        fail(f"{path}: no examples (the file is empty); expected one JSON object per line")
    return rows


def label_ids(files):
    """{label: class index} over all files, sorted; labels must all be integers or all strings ("0" and 0 are
    different labels to JSON and would silently make two classes)."""
    first = None
    for path, rows in files:
        for number, _, label in rows:
            if first is None:
                first = (path, number, label)
            elif type(label) is not type(first[2]):
                fail(f"{path}:{number}: label {json.dumps(label)} is {_kind(label)}, but {first[0]}:{first[1]} has "
                     f"{json.dumps(first[2])}, {_kind(first[2])}; use one type for all labels")
    labels = sorted({label for _, rows in files for _, _, label in rows})
    return {label: i for i, label in enumerate(labels)}


class TextDataset(Dataset):
    """User rows tokenized once, truncated to max_length."""

    def __init__(self, rows, tokenizer, max_length, labels=None):
        self.items = []
        for _, text, label in rows:
            enc = tokenizer(text, truncation=True, max_length=max_length)
            ids = torch.tensor(enc["input_ids"])
            target = ids.clone() if labels is None else torch.tensor(labels[label])
            self.items.append({"input_ids": ids, "labels": target})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def user_datasets(args, tokenizer, causal_lm):
    """(train, eval, num_labels or None) from --train-file / --eval-file."""
    train_rows = read_jsonl(args.train_file, need_label=not causal_lm)
    if args.eval_file is not None:
        eval_rows = read_jsonl(args.eval_file, need_label=not causal_lm)
    else:
        n_eval = max(1, len(train_rows) // 10)
        if len(train_rows) < 2:
            fail(f"{args.train_file}: 1 example; a split into training and evaluation needs 2 or more "
                 f"(or give --eval-file)")
        train_rows, eval_rows = train_rows[:-n_eval], train_rows[-n_eval:]
    labels = None if causal_lm else label_ids([(args.train_file, train_rows),
                                               (args.eval_file or args.train_file, eval_rows)])
    make = lambda rows: TextDataset(rows, tokenizer, args.max_length, labels)  # noqa: E731
    return make(train_rows), make(eval_rows), (len(labels) if labels else None)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

class EpochShuffle(Sampler):
    """A fresh permutation per epoch drawn from (seed, epoch) alone, so a run resumed at epoch e, batch b sees
    exactly the batches the uninterrupted run saw. `set_epoch` before each pass."""

    def __init__(self, size, seed):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self):
        return self.size


def collate(batch, pad_id):
    """Pads to the longest sequence of the batch; labels of padded positions are -100."""
    length = max(item["input_ids"].numel() for item in batch)
    out = {"input_ids": torch.full((len(batch), length), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros(len(batch), length, dtype=torch.long)}
    token_labels = batch[0]["labels"].dim() == 1
    out["labels"] = (torch.full((len(batch), length), -100, dtype=torch.long) if token_labels
                     else torch.stack([item["labels"] for item in batch]))
    for row, item in enumerate(batch):
        n = item["input_ids"].numel()
        out["input_ids"][row, :n] = item["input_ids"]
        out["attention_mask"][row, :n] = 1
        if token_labels:
            out["labels"][row, :n] = item["labels"]
    return out


class Collate:
    """`collate` with a fixed pad id, as a picklable object (DataLoader workers pickle it; a lambda fails)."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, batch):
        return collate(batch, self.pad_id)
