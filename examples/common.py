"""What the two fine-tuning scripts share beyond options, data and the loop: the model set-up (attention, position-
table extension through `hf_flash.patch`, LoRA that trains the extended table, gradient checkpointing), the
accelerator and its start-up banner, and `run_job`, the sequence both scripts run.

    options.py        the command line, its defaults and checks (errors: one line, exit status 2)
    example_data.py   built-in synthetic data, user jsonl (checked line by line), batching
    training_loop.py  the Accelerate loop, evaluation, resume, the summary
    checkpointing.py  atomic checkpoints, rotation, graceful SIGINT / SIGTERM
    report.py         the classification job's side-by-side comparison and its plot
"""

import logging
import os
import sys
import time
import warnings

import torch

# Run from a checkout, the scripts use that checkout's hf_flash rather than another installed copy.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, "hf_flash")) and _REPO not in sys.path:
    sys.path.insert(0, _REPO)
import hf_flash  # noqa: E402
from hf_flash.patches import position_capacity, REGISTRY  # noqa: E402

import checkpointing  # noqa: E402
import training_loop  # noqa: E402
from example_data import (BOS, EOS, EVIDENCE_A, EVIDENCE_B, FIRST_FREE, PAD, QUERY, SYNTH_VOCAB,  # noqa: E402,F401
                          SyntheticDataset, TokenMap, example_rng, user_datasets)
from options import BUILTIN, build_parser, checked_sparsity, fail, resolve_defaults  # noqa: E402,F401

OURS = (hf_flash.ATTN_IMPLEMENTATION, hf_flash.SPARSE_ATTN_IMPLEMENTATION)


def quiet_libraries():
    """Silences what a user would otherwise read past on every run: transformers' and huggingface_hub's progress
    bars for writing and loading weights, and their info-level chatter."""
    import transformers
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass
    # PEFT's get_peft_model reads transformers' deprecated `is_gradient_checkpointing` (transformers 5.25 warns).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Accelerate's save_state drops GPT-2's tied lm_head.weight (it is wte's) and says so at every checkpoint.
    logging.getLogger("accelerate.utils.other").addFilter(
        lambda record: "Removed shared tensor" not in record.getMessage())


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def load_tokenizer(args):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained(auto_class, args, tokenizer, **kwargs):
    # fp32 master weights whatever the checkpoint stores: --mixed-precision autocasts the compute, and AdamW on
    # fp16 weights diverges (its eps and small updates underflow).
    try:
        model = auto_class.from_pretrained(args.model, attn_implementation=args.attn, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as error:
        fail(f"--model {args.model}: {str(error).splitlines()[0]}")
    if model.config.pad_token_id is None:  # batches are padded; GPT-2 checkpoints name no pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def setup_model(model, args, tokenizer, lora_task_type, accelerator):
    """Position-table extension and attention (hf_flash.patch), sparsity, gradient checkpointing, then LoRA, whose
    adapter also trains and saves an extended table (hf_flash.train_positions)."""
    sparsity = checked_sparsity(args.sparsity)
    table = position_capacity(model.config)
    if table is None and args.max_length > getattr(model.config, "max_position_embeddings", args.max_length):
        fail(f"--max-length {args.max_length}: {args.model} has {model.config.max_position_embeddings} positions "
             f"and hf_flash.patch extends only {sorted(REGISTRY)} position tables; use --max-length <= "
             f"{model.config.max_position_embeddings}")
    extended = table is not None and args.max_length > table
    if extended:
        accelerator.print(f"extending the position table from {table} to {args.max_length} (hf_flash.patch)")
        model = hf_flash.patch(model, max_positions=args.max_length, sparsity=sparsity, tokenizer=tokenizer)
    elif sparsity is not None:
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
        # GPT-2's Conv1D stores its weights transposed; saying so up front spares PEFT's warning that it corrected it.
        model = get_peft_model(model, LoraConfig(task_type=lora_task_type, r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                 lora_dropout=0.0, fan_in_fan_out=model.config.model_type == "gpt2"))
        if extended:
            hf_flash.train_positions(model)
        if accelerator.is_main_process:
            model.print_trainable_parameters()
    return model


def attention_that_ran(args, device):
    """What computes attention, in words. For hf_flash's names the answer comes from hf_flash.integration's own test
    (`_runs_kernels`, the one its attention functions apply on every call), so the summary cannot disagree with what
    ran: the Triton kernels on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1);
    otherwise plain PyTorch attention. Its one-time fallback RuntimeWarning is left to the banner."""
    if args.attn not in OURS:
        return args.attn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kernels = hf_flash.integration._runs_kernels(device)
    if kernels:
        return args.attn if device.type == "cuda" else f"{args.attn} (Triton kernels in the interpreter, " \
                                                       f"TRITON_INTERPRET=1)"
    return (f"plain PyTorch attention (hf_flash's {device.type.upper()} fallback for {args.attn}; its Triton kernels "
            f"need a GPU)")


def make_accelerator(args, gpu):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum)
    set_seed(args.seed)
    if not gpu:
        # The banner below says it once; integration's own RuntimeWarning would repeat it with a source line.
        warnings.filterwarnings("ignore", message="hf_triton runs its Triton kernels on CUDA GPUs",
                                category=RuntimeWarning)
        model = (f"the built-in {args.layers}-layer, {args.hidden_size}-wide model trained from scratch"
                 if args.model is None else args.model)
        accelerator.print(f"No GPU found: running on the CPU: {model}, {args.max_length} tokens per sequence. "
                          f"Attention: {attention_that_ran(args, accelerator.device)}.")
    return accelerator


def prepare_output_dir(args, accelerator):
    """Creates --output-dir, resolves --resume to a checkpoint (checked against this run's arguments), refuses to
    mix a fresh run with an earlier run's checkpoints, writes args.json."""
    if args.resume is not None:  # every process loads the same checkpoint
        args.resume = checkpointing.resume_path(args.resume, args.output_dir)
        checkpointing.check_resumable(args.resume, training_loop.run_args(args, accelerator))
    earlier = checkpointing.complete_checkpoints(args.output_dir)
    if earlier and args.resume is None:  # checked on every process, so that none is left waiting at a barrier
        fail(f"--output-dir {args.output_dir} holds {os.path.basename(earlier[-1][1])} from an earlier run: "
             f"continue it with --resume, or delete it or choose another --output-dir")
    if accelerator.is_main_process:
        checkpointing.remove_temporaries(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        import json
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    accelerator.wait_for_everyone()


def run_job(args, gpu, task, build_model, lora_task_type, causal_lm, started=None):
    """Data (checked) -> accelerator -> model -> training. `build_model(args, num_labels, tokenizer)`."""
    started = started or time.time()
    quiet_libraries()
    tokenizer = load_tokenizer(args) if args.model is not None else None
    if args.train_file is not None:
        train_set, eval_set, num_labels = user_datasets(args, tokenizer, causal_lm)
    else:
        token_map = TokenMap(tokenizer, args.seed) if tokenizer is not None else None
        train_set = SyntheticDataset(task.make, args.train_size, args.seed, "train", token_map)
        eval_set = SyntheticDataset(task.make, args.eval_size, args.seed, "eval", token_map)
        num_labels = None
    accelerator = make_accelerator(args, gpu)
    prepare_output_dir(args, accelerator)
    with accelerator.main_process_first():
        model = build_model(args, num_labels, tokenizer)
    model = setup_model(model, args, tokenizer, lora_task_type, accelerator)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else PAD
    attention = attention_that_ran(args, accelerator.device)
    return training_loop.train(args, task, model, tokenizer, train_set, eval_set, pad_id, accelerator, attention,
                               started)


def script_name(path):
    return os.path.splitext(os.path.basename(path))[0]


def argv_or_sys(argv):
    return sys.argv[1:] if argv is None else argv
