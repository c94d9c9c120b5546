"""The fine-tuning scripts' command line: the options, their device-dependent defaults, and the checks that run
before anything is loaded. Every error is one line, `<script>: error: <flag or file:line>: <what was expected>`,
with exit status 2 (argparse's own convention for usage errors).
"""

import argparse
import math
import os
import sys

ATTN_CHOICES = ("hf_triton", "hf_triton_sparse", "sdpa", "eager")
BUILTIN = "builtin"  # --model value: the built-in small config, trained from scratch


def fail(message):
    """Ends the run with one line on stderr and exit status 2. Under `accelerate launch` every process checks the
    same things; only the first one prints."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{os.path.basename(sys.argv[0]) or 'finetune'}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see --help)")


class _Formatter(argparse.HelpFormatter):
    """Shows "(default: X)" once, and only for a real default: None means the help text states the default (it
    depends on the device or on other options), and a flag's False needs no mention."""

    def _get_help_string(self, action):
        text = action.help or ""
        unstated = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unstated or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _bounded(kind, low, strict=False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value) or value < low or (strict and value == low):
            bound = f"> {low}" if strict else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} {bound}, "
                                             f"got {text!r}")
        return value
    return parse


positive_int = _bounded(int, 1)
non_negative_int = _bounded(int, 0)
positive_float = _bounded(float, 0.0, strict=True)


def _device_default(defaults, name, fmt=str):
    gpu, cpu = defaults["gpu"][name], defaults["cpu"][name]
    if gpu == cpu:
        return f"default: {fmt(gpu)}"
    return f"default: {fmt(gpu)} on a GPU, {fmt(cpu)} on the CPU"


def build_parser(description, defaults, lr_help):
    """The options both scripts share. `defaults`: {"gpu": {...}, "cpu": {...}} for the options whose default
    depends on the device (model, max_length, hidden_size, layers, heads, steps, mixed_precision), filled in by
    `resolve_defaults`; their help states both values."""
    d = lambda name, fmt=str: _device_default(defaults, name, fmt)  # noqa: E731
    p = _Parser(description=description, formatter_class=_Formatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"a hub id or a local directory, or '{BUILTIN}' for a small config trained from scratch "
                        f"(no download) ({d('model')})")
    g.add_argument("--attn", default="hf_triton", choices=ATTN_CHOICES,
                   help="attention implementation (hf_triton runs its Triton kernels on a GPU; on the CPU it falls "
                        "back to plain PyTorch attention)")
    g.add_argument("--sparsity", default=None,
                   help="block-sparse layout for --attn hf_triton_sparse: a pattern name (bigbird, local, butterfly), "
                        "optionally with fields, e.g. 'bigbird:block=128,window=3,global=1,random=2', or a JSON dict "
                        "(default: none, dense attention)")
    g.add_argument("--max-length", type=positive_int, default=None,
                   help=f"tokens per sequence; longer than a pretrained model's position table, the table is "
                        f"extended with hf_flash.patch ({d('max_length')})")
    g.add_argument("--hidden-size", type=positive_int, default=None, help=f"built-in model only ({d('hidden_size')})")
    g.add_argument("--layers", type=positive_int, default=None, help=f"built-in model only ({d('layers')})")
    g.add_argument("--heads", type=positive_int, default=None,
                   help=f"built-in model only; must divide --hidden-size ({d('heads')})")
    g.add_argument("--lora", action="store_true",
                   help="train LoRA adapters (PEFT) instead of all weights; an extended position table is trained "
                        "and saved with them")
    g.add_argument("--lora-r", type=positive_int, default=8, help="LoRA rank (lora_alpha is twice the rank)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward: less memory, about a third more compute")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_float, default=None,
                   help="passes over the training set, instead of --steps (default: use --steps)")
    g.add_argument("--steps", type=positive_int, default=None, help=f"optimizer steps ({d('steps')})")
    g.add_argument("--batch-size", type=positive_int, default=8, help="examples per device per micro-batch")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=positive_float, default=None, help=lr_help)
    g.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help="linear warm-up steps, then linear decay to 0 (default: 5%% of the steps)")
    g.add_argument("--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
                   help=f"autocast dtype; weights stay fp32 ({d('mixed_precision')})")
    g.add_argument("--seed", type=int, default=0, help="seeds the data, the initialisation and dropout")

    g = p.add_argument_group("data")
    g.add_argument("--train-file", default=None,
                   help="jsonl, one {\"text\": ...} object per line (classification: and a \"label\", all labels "
                        "integers or all strings); needs --model for its tokenizer (default: the built-in task)")
    g.add_argument("--eval-file", default=None,
                   help="jsonl like --train-file (default: the last 10%% of --train-file)")
    g.add_argument("--train-size", type=positive_int, default=4096, help="built-in data: training examples")
    g.add_argument("--eval-size", type=positive_int, default=256, help="built-in data: evaluation examples")
    g.add_argument("--num-workers", type=non_negative_int, default=0,
                   help="DataLoader worker processes (0: load in the training process)")

    g = p.add_argument_group("evaluation, checkpoints and output")
    g.add_argument("--eval-every", type=positive_int, default=None,
                   help="optimizer steps between evaluations (default: 8 evaluations per run)")
    g.add_argument("--save-every", type=non_negative_int, default=0,
                   help="optimizer steps between checkpoints (full training state, resumable); 0: none, only the "
                        "final model (Ctrl-C / SIGTERM still saves one)")
    g.add_argument("--save-total-limit", type=non_negative_int, default=2,
                   help="checkpoints kept in --output-dir, the newest; 0 keeps all")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint directory, or with no value from the newest complete checkpoint "
                        "in --output-dir (default: start afresh)")
    g.add_argument("--output-dir", default=None, help="run directory (default: runs/<script name>)")
    return p


def resolve_defaults(args, script_name, defaults, lr_for):
    """Fills the device-dependent defaults in place and checks what argparse cannot check alone; returns whether a
    GPU is used. `lr_for(args)` gives the default learning rate once the model is known."""
    import torch
    gpu = torch.cuda.is_available()
    shape_flags = [name for name in ("hidden_size", "layers", "heads") if getattr(args, name, None) is not None]
    for name, value in defaults["gpu" if gpu else "cpu"].items():
        if getattr(args, name, None) is None and not (name == "steps" and args.epochs is not None):
            setattr(args, name, value)
    if args.epochs is not None and args.steps is not None:
        fail("--epochs and --steps: give one of them, not both")
    if args.model == BUILTIN:
        args.model = None
    elif shape_flags:  # a pretrained model has its own shape: the flag would be silently ignored
        flag = shape_flags[0]
        fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} is for --model {BUILTIN} (the small config trained "
             f"from scratch); --model {args.model} has its own")
    if args.lr is None:
        args.lr = lr_for(args)
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", script_name)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        fail(f"--output-dir: {args.output_dir} is a file; expected a directory (it is created if missing)")
    for flag, path in (("--train-file", args.train_file), ("--eval-file", args.eval_file)):
        if path is not None and not os.path.isfile(path):
            fail(f"{flag}: {path}: no such file" if not os.path.exists(path) else f"{flag}: {path} is not a file")
    if args.eval_file is not None and args.train_file is None:
        fail("--eval-file needs --train-file (the built-in task makes its own evaluation set)")
    if args.train_file is not None and args.model is None:
        fail("--train-file needs --model: user text is tokenized with that model's tokenizer")
    if args.attn == "hf_triton_sparse" and args.sparsity is None:
        fail("--attn hf_triton_sparse needs --sparsity, e.g. --sparsity bigbird:block=128,window=3")
    if args.sparsity is not None and args.attn != "hf_triton_sparse":
        fail(f"--sparsity is for --attn hf_triton_sparse, not {args.attn}")
    if args.model is None and args.hidden_size % args.heads:
        fail(f"--heads {args.heads} must divide --hidden-size {args.hidden_size}")
    return gpu


def parse_sparsity(text):
    """'bigbird' / 'bigbird:block=64,window=2' / '{"pattern": "bigbird", ...}' -> checked dict (or None)."""
    import json

    import hf_flash
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


def checked_sparsity(text):
    """parse_sparsity for the command line: a bad layout is a usage error naming --sparsity."""
    try:
        return parse_sparsity(text)
    except (ValueError, TypeError) as error:
        fail(f"--sparsity: {error}")
