"""What the two fine-tuning scripts share: arguments, built-in long-context data, model set-up (attention,
position-table extension through `hf_flash.patch`, LoRA, gradient checkpointing), the Accelerate training loop,
evaluation, checkpoints and the JSON summary.

Built-in data (no download, no tokenizer): token ids are generated directly over a 512-token synthetic vocabulary,
deterministically from (seed, split, index). With `--model` the synthetic ids are mapped one-to-one onto ordinary
ids of that model's tokenizer (`TokenMap`), so the same tasks run on a pretrained BERT / GPT-2.
"""

import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

# Run from a checkout, the scripts use that checkout's hf_flash rather than another installed copy.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, "hf_flash")) and _REPO not in sys.path:
    sys.path.insert(0, _REPO)
import hf_flash  # noqa: E402

ATTN_CHOICES = ("hf_triton", "hf_triton_sparse", "sdpa", "eager")

# Synthetic vocabulary: a few markers, then task-specific ranges (see the scripts), then filler.
SYNTH_VOCAB = 512
PAD, BOS, EOS, QUERY, EVIDENCE_A, EVIDENCE_B = 0, 1, 2, 3, 4, 5
FIRST_FREE = 16

# Optimizer steps left out of tokens/s (kernel compilation and autotuning happen there); at most half the run.
WARMUP_STEPS_UNTIMED = 3

# Defaults that depend on whether a GPU is present: the CPU default finishes in minutes.
GPU_DEFAULTS = dict(max_length=4096, hidden_size=256, layers=4, heads=4, steps=400, batch_size=8)
CPU_DEFAULTS = dict(max_length=256, hidden_size=64, layers=2, heads=2, steps=150, batch_size=8)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def build_parser(description):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="hub id or local directory; default: a built-in small config trained from scratch "
                        "(no download)")
    g.add_argument("--attn", default="hf_triton", choices=ATTN_CHOICES, help="attention implementation")
    g.add_argument("--sparsity", default=None,
                   help="block-sparse layout for --attn hf_triton_sparse: a pattern name (bigbird, local, "
                        "butterfly), optionally with fields, e.g. 'bigbird:block=128,window=3,global=1,random=2', "
                        "or a JSON dict")
    g.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per sequence (default: {GPU_DEFAULTS['max_length']} on GPU, "
                        f"{CPU_DEFAULTS['max_length']} on CPU). Longer than a pretrained model's position table: "
                        f"the table is extended with hf_flash.patch")
    g.add_argument("--hidden-size", type=int, default=None, help="built-in config only")
    g.add_argument("--layers", type=int, default=None, help="built-in config only")
    g.add_argument("--heads", type=int, default=None, help="built-in config only")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT) instead of all weights")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--gradient-checkpointing", action="store_true")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=None, help="passes over the training set (instead of --steps)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default: {GPU_DEFAULTS['steps']} on GPU, {CPU_DEFAULTS['steps']} on CPU; "
                        f"LM: 500 on CPU)")
    g.add_argument("--batch-size", type=int, default=None, help="per device, per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="default: 1e-3 (LM: 2e-3) from scratch, 5e-5 pretrained, 5e-4 LoRA")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("data")
    g.add_argument("--train-file", default=None, help="jsonl with a 'text' field (and 'label' for classification); "
                                                       "needs --model for its tokenizer")
    g.add_argument("--eval-file", default=None, help="jsonl like --train-file (default: 10%% of --train-file)")
    g.add_argument("--train-size", type=int, default=4096, help="built-in data: training examples")
    g.add_argument("--eval-size", type=int, default=256, help="built-in data: evaluation examples")

    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, default=None, help="optimizer steps between evaluations "
                                                                "(default: 4 evaluations per run)")
    g.add_argument("--save-every", type=int, default=0, help="optimizer steps between checkpoints (0: final only)")
    g.add_argument("--output-dir", default=None, help="default: runs/<script name>")
    g.add_argument("--num-workers", type=int, default=0)
    return p


def resolve_defaults(args, script_name, cpu_overrides=None, scratch_lr=1e-3):
    """Fills the device-dependent defaults in place (`cpu_overrides`: a script's own CPU defaults); returns
    whether a GPU is used."""
    gpu = torch.cuda.is_available()
    defaults = GPU_DEFAULTS if gpu else {**CPU_DEFAULTS, **(cpu_overrides or {})}
    for name, value in defaults.items():
        if getattr(args, name) is None and not (name == "steps" and args.epochs is not None):
            setattr(args, name, value)
    if args.epochs is not None and args.steps is not None:
        raise SystemExit("give --epochs or --steps, not both")
    if args.lr is None:
        args.lr = 5e-4 if args.lora else (scratch_lr if args.model is None else 5e-5)
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", script_name)
    if args.train_file is not None and args.model is None:
        raise SystemExit("--train-file needs --model: user text is tokenized with that model's tokenizer")
    if args.attn == "hf_triton_sparse" and args.sparsity is None:
        raise SystemExit("--attn hf_triton_sparse needs --sparsity, e.g. --sparsity bigbird:block=128,window=3")
    return gpu


def parse_sparsity(text):
    """'bigbird' / 'bigbird:block=64,window=2' / '{"pattern": "bigbird", ...}' -> checked dict (or None)."""
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        spec = json.loads(text)
    else:
        pattern, _, fields = text.partition(":")
        spec = {"pattern": pattern.strip()}
        for item in filter(None, fields.split(",")):
            key, _, value = item.partition("=")
            spec[key.strip()] = int(value)
    return hf_flash.integration.check_sparsity(spec)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

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
            raise ValueError(f"the tokenizer has {len(ordinary)} ordinary tokens; the built-in tasks need "
                             f"{SYNTH_VOCAB}")
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


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class TextDataset(Dataset):
    """User data: jsonl rows with 'text' (and 'label'), tokenized once, truncated to max_length."""

    def __init__(self, rows, tokenizer, max_length, label_ids=None, causal_lm=False):
        self.items = []
        for row in rows:
            enc = tokenizer(row["text"], truncation=True, max_length=max_length)
            item = {"input_ids": torch.tensor(enc["input_ids"])}
            if causal_lm:
                item["labels"] = item["input_ids"].clone()
            else:
                item["labels"] = torch.tensor(label_ids[row["label"]])
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def user_datasets(args, tokenizer, causal_lm):
    """(train, eval, num_labels) from --train-file / --eval-file."""
    train_rows = read_jsonl(args.train_file)
    if args.eval_file is not None:
        eval_rows = read_jsonl(args.eval_file)
    else:
        n_eval = max(1, len(train_rows) // 10)
        train_rows, eval_rows = train_rows[:-n_eval], train_rows[-n_eval:]
    label_ids = None
    if not causal_lm:
        labels = sorted({row["label"] for row in train_rows + eval_rows}, key=str)
        label_ids = {label: i for i, label in enumerate(labels)}
    make = lambda rows: TextDataset(rows, tokenizer, args.max_length, label_ids, causal_lm)  # noqa: E731
    return make(train_rows), make(eval_rows), (len(label_ids) if label_ids else None)


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


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def position_table_size(config):
    """Positions the model's absolute position table can encode (None: no absolute table, e.g. RoPE)."""
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        return config.max_position_embeddings - config.pad_token_id - 1  # positions start after padding_idx
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None) is not None and config.model_type in ("bert", "gpt2", "distilbert",
                                                                             "electra", "ernie"):
            return getattr(config, name)
    return None


def load_tokenizer(args):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_data(args, task, causal_lm):
    """(tokenizer or None, train set, eval set, number of labels or None): the user's jsonl files with
    the model's tokenizer, or the built-in task (mapped onto that tokenizer when --model is given)."""
    tokenizer = load_tokenizer(args) if args.model is not None else None
    if args.train_file is not None:
        return (tokenizer, *user_datasets(args, tokenizer, causal_lm))
    token_map = TokenMap(tokenizer, args.seed) if tokenizer is not None else None
    train_set = SyntheticDataset(task.make, args.train_size, args.seed, "train", token_map)
    eval_set = SyntheticDataset(task.make, args.eval_size, args.seed, "eval", token_map)
    return tokenizer, train_set, eval_set, None


def load_pretrained(auto_class, args, tokenizer, **kwargs):
    # fp32 master weights whatever the checkpoint stores: --mixed-precision autocasts the compute, and AdamW on
    # fp16 weights diverges (its eps and small updates underflow).
    model = auto_class.from_pretrained(args.model, attn_implementation=args.attn, dtype=torch.float32, **kwargs)
    if model.config.pad_token_id is None:  # batches are padded; GPT-2 checkpoints name no pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def setup_model(model, args, tokenizer, lora_task_type, accelerator):
    """Position-table extension, attention, sparsity, gradient checkpointing and LoRA, in that order."""
    sparsity = parse_sparsity(args.sparsity)
    table = position_table_size(model.config)
    if table is not None and args.max_length > table:
        if not hasattr(hf_flash, "patch"):
            raise SystemExit(f"--max-length {args.max_length} exceeds {args.model}'s position table ({table}) and "
                             f"this hf_flash has no hf_flash.patch to extend it; use --max-length <= {table}")
        accelerator.print(f"extending the position table from {table} to {args.max_length} (hf_flash.patch)")
        model = hf_flash.patch(model, max_positions=args.max_length, sparsity=sparsity, tokenizer=tokenizer)
    if sparsity is not None:
        setattr(model.config, hf_flash.integration.SPARSITY_CONFIG_KEY, sparsity)
    if model.config._attn_implementation != args.attn:
        model.set_attn_implementation(args.attn)
    if args.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; older: the deprecated name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if args.lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(task_type=lora_task_type, r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                 lora_dropout=0.0))
        if accelerator.is_main_process:
            model.print_trainable_parameters()
    return model


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def peak_memory():
    """(peak GPU memory allocated, MiB or None; peak resident memory of this process, MiB)."""
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return gpu, rss_kib / 1024


def save_checkpoint(accelerator, model, tokenizer, directory, lora):
    """Writes a directory that `AutoModelFor...from_pretrained(directory)` reloads: with --lora the adapters are
    merged into a copy of the weights for it, and the adapter alone goes to `directory/adapter` (PEFT's
    `PeftModel.from_pretrained(base, directory/adapter)`)."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    if lora:
        import copy
        unwrapped.save_pretrained(os.path.join(directory, "adapter"))
        unwrapped = copy.deepcopy(unwrapped).merge_and_unload()
    unwrapped.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def train(args, task, model, tokenizer, train_set, eval_set, pad_id, accelerator):
    """The loop both scripts run. `task.evaluate(model, batch)` returns per-example (batch,) tensors, which are
    gathered across processes (without the duplicates that even batches add), summed over the evaluation set and
    turned into metrics by `task.finish_eval(sums)`. Returns the summary dict (also written as summary.json)."""
    loader_kwargs = dict(batch_size=args.batch_size, collate_fn=lambda b: collate(b, pad_id),
                         num_workers=args.num_workers)
    train_loader = DataLoader(train_set, shuffle=True, generator=torch.Generator().manual_seed(args.seed),
                              drop_last=True, **loader_kwargs)
    eval_loader = DataLoader(eval_set, shuffle=False, **loader_kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    steps_per_epoch = max(1, len(train_loader) // (args.grad_accum * accelerator.num_processes))
    total_steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = args.warmup_steps if args.warmup_steps is not None else total_steps // 20
    schedule = lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, 1 - s / total_steps)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The scheduler stays unprepared and steps once per optimizer step: accelerate's wrapper steps it once per
    # process, which would run the schedule num_processes times faster than on one GPU.
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    eval_every = args.eval_every or max(1, math.ceil(total_steps / 4))
    untimed = min(WARMUP_STEPS_UNTIMED, total_steps // 2)

    def run_eval():
        model.eval()
        sums = {}
        with torch.no_grad():
            for batch in eval_loader:
                for key, value in task.evaluate(model, batch).items():
                    total = accelerator.gather_for_metrics(value.detach().float().reshape(-1)).sum().item()
                    sums[key] = sums.get(key, 0.0) + total
        model.train()
        return task.finish_eval(sums)

    from tqdm.auto import tqdm
    progress = tqdm(total=total_steps, desc="train", disable=not accelerator.is_local_main_process)
    history, step, tokens, train_time, loss_sum, loss_count, last_loss = [], 0, 0, 0.0, 0.0, 0, float("nan")
    model.train()
    epoch = 0
    while step < total_steps:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        for batch in train_loader:
            start = time.perf_counter()
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            # tokens/s leaves out the first optimizer steps, which compile and autotune the kernels
            if step >= untimed:
                train_time += time.perf_counter() - start
                tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            last_loss = loss_sum / loss_count
            loss_sum, loss_count = 0.0, 0
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens / max(train_time, 1e-9):.0f}")
            if step % eval_every == 0 or step == total_steps:
                metrics = run_eval()
                history.append({"step": step, "train_loss": last_loss, **metrics})
                progress.write(f"step {step}: train loss {last_loss:.4f}, "
                               + ", ".join(f"eval {k} {v:.4f}" for k, v in metrics.items()))
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                save_checkpoint(accelerator, model, tokenizer, os.path.join(args.output_dir, f"checkpoint-{step}"),
                                args.lora)
            if step >= total_steps:
                break
        epoch += 1
    progress.close()

    final_dir = os.path.join(args.output_dir, "final")
    save_checkpoint(accelerator, model, tokenizer, final_dir, args.lora)
    gpu_mib, rss_mib = peak_memory()
    summary = {
        "script": task.name,
        "model": args.model or "built-in config (from scratch)",
        "attn_implementation": args.attn,
        "sparsity": parse_sparsity(args.sparsity),
        "max_length": args.max_length,
        "lora": args.lora,
        "gradient_checkpointing": args.gradient_checkpointing,
        "mixed_precision": args.mixed_precision,
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "steps": step,
        "batch_size_per_device": args.batch_size,
        "grad_accum": args.grad_accum,
        "final_train_loss": last_loss,
        "eval": history[-1] if history else None,
        "history": history,
        "train_tokens": tokens,
        "train_seconds": train_time,  # after the first `untimed` optimizer steps
        "untimed_warmup_steps": untimed,
        "tokens_per_second": tokens / train_time if train_time else None,
        "peak_gpu_memory_mib": gpu_mib,
        "peak_process_rss_mib": rss_mib,
        "checkpoint": final_dir,
    }
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        accelerator.print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    accelerator.end_training()
    return summary


def make_accelerator(args, gpu):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum)
    set_seed(args.seed)
    if not gpu:
        accelerator.print("No GPU found: running on the CPU with a tiny model and short sequences "
                          f"(max_length={args.max_length}). hf_triton falls back to PyTorch attention on CPU "
                          "tensors unless TRITON_INTERPRET=1 (then its Triton kernels run in the interpreter, "
                          "slowly).")
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    return accelerator


def script_name(path):
    return os.path.splitext(os.path.basename(path))[0]


def argv_or_sys(argv):
    return sys.argv[1:] if argv is None else argv
