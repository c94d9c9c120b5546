"""The Accelerate training loop both scripts run: batches, optimizer and schedule, evaluation, checkpoints,
resume, a graceful stop, and the JSON summary.

Resuming reproduces the uninterrupted run exactly (bit for bit on the CPU): checkpoints are taken at optimizer-step
boundaries; Accelerate restores weights, optimizer, schedule and RNG states; `Progress` (registered for
checkpointing) restores the loop's position; the epoch-seeded shuffle and `skip_first_batches` replay the rest of
the interrupted epoch.
"""

import json
import math
import os
import resource
import time

import torch
from torch.utils.data import DataLoader

import checkpointing
from example_data import Collate, EpochShuffle
from options import fail

# Optimizer steps left out of tokens/s (kernel compilation and autotuning happen there); at most half the run.
WARMUP_STEPS_UNTIMED = 3
DEFAULT_EVALUATIONS = 8


class Progress:
    """Where the loop is and what it has measured; saved and restored with the training state."""

    FIELDS = ("step", "epoch", "batches_in_epoch", "tokens", "train_time", "history", "train_losses")

    def __init__(self):
        self.step = self.epoch = self.batches_in_epoch = self.tokens = 0
        self.train_time = 0.0
        self.history, self.train_losses = [], []

    def state_dict(self):
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state):
        for name in self.FIELDS:
            setattr(self, name, state[name])


def peak_memory():
    """(peak GPU memory allocated, MiB or None; peak resident memory of this process, MiB)."""
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return gpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_args(args, accelerator):
    return {**vars(args), "num_processes": accelerator.num_processes}


def make_loaders(args, train_set, eval_set, pad_id, accelerator):
    """(shuffle sampler, train loader, eval loader); ends the run when not one optimizer step could be made."""
    per_step = args.batch_size * accelerator.num_processes
    if len(train_set) < per_step:
        processes = f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
        source = f"{args.train_file} holds" if args.train_file else f"--train-size {len(train_set)}:"
        fail(f"{source} {len(train_set)} training examples, fewer than one batch (--batch-size "
             f"{args.batch_size}{processes}); lower --batch-size or add examples")
    sampler = EpochShuffle(len(train_set), args.seed)
    common = dict(batch_size=args.batch_size, collate_fn=Collate(pad_id), num_workers=args.num_workers)
    # drop_last: every step sees full batches on every process (uneven last batches would stall DDP).
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, **common)
    eval_loader = DataLoader(eval_set, shuffle=False, **common)
    return sampler, train_loader, eval_loader


def train(args, task, model, tokenizer, train_set, eval_set, pad_id, accelerator, attention, started):
    """Trains, evaluates every --eval-every steps and at the end, saves checkpoints and the final model, and returns
    the summary (also written as summary.json). `task.evaluate(model, batch)` returns per-example (batch,) sums,
    gathered across processes (without the duplicates that even batches add), added over the evaluation set and
    turned into metrics by `task.finish_eval(sums)`. `attention`: which attention actually ran, for the summary."""
    _, train_loader, eval_loader = make_loaders(args, train_set, eval_set, pad_id, accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum)  # len: this process's batches per epoch
    total_steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = args.warmup_steps if args.warmup_steps is not None else total_steps // 20
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, 1 - s / total_steps))
    # The scheduler stays unprepared and steps once per optimizer step (accelerate's wrapper steps it once per
    # process, which would run the schedule num_processes times faster than on one GPU); registered, it is saved.
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress)

    resumed_from = args.resume  # a checkpoint directory, resolved and checked by common.prepare_output_dir
    if resumed_from is not None:
        accelerator.load_state(os.path.join(resumed_from, checkpointing.STATE_DIR))
        accelerator.print(f"resumed from {resumed_from} at step {progress.step} of {total_steps}")

    eval_every = args.eval_every or max(1, math.ceil(total_steps / DEFAULT_EVALUATIONS))
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
        return {f"eval_{k}": v for k, v in task.finish_eval(sums).items()}

    def state():
        return {**progress.state_dict(), "total_steps": total_steps, "args": run_args(args, accelerator)}

    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=progress.step, desc="train", disable=not accelerator.is_local_main_process)
    postfix = {}
    if progress.history:
        postfix.update(task.shown(progress.history[-1]))
    saved_at, first_step_at, loss_sum, loss_count = None, None, 0.0, 0
    model.train()
    with checkpointing.StopSignals(announce=bar.write) as stop:
        while progress.step < total_steps:
            # Accelerate's loader hands its own epoch counter to the sampler on every pass; set that counter.
            train_loader.set_epoch(progress.epoch)
            loader = (accelerator.skip_first_batches(train_loader, progress.batches_in_epoch)
                      if progress.batches_in_epoch else train_loader)
            steps_before = progress.step
            for batch in loader:
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
                progress.batches_in_epoch += 1
                if progress.step >= untimed:  # the first optimizer steps compile and autotune the kernels
                    progress.train_time += time.perf_counter() - start
                    progress.tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
                loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
                if not accelerator.sync_gradients:
                    continue

                progress.step += 1
                first_step_at = first_step_at or time.time()
                last_loss, loss_sum, loss_count = loss_sum / loss_count, 0.0, 0
                progress.train_losses.append(last_loss)
                if progress.step % eval_every == 0 or progress.step == total_steps:
                    metrics = run_eval()
                    progress.history.append({"step": progress.step, "train_loss": last_loss, **metrics})
                    postfix.update(task.shown(progress.history[-1]))
                    bar.write(f"step {progress.step}: train loss {last_loss:.4f}, "
                              + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items()))
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", **postfix,
                                tok_s=f"{progress.tokens / max(progress.train_time, 1e-9):.0f}")
                if args.save_every and progress.step % args.save_every == 0 and progress.step < total_steps:
                    saved_at = (progress.step, checkpointing.save_checkpoint(
                        accelerator, model, tokenizer, args.output_dir, progress.step, state(), args.lora,
                        args.save_total_limit))
                if stop.signal is not None:
                    accelerator.set_trigger()
                if accelerator.check_trigger() if accelerator.num_processes > 1 else stop.signal is not None:
                    bar.close()
                    if saved_at is None or saved_at[0] != progress.step:
                        saved_at = (progress.step, checkpointing.save_checkpoint(
                            accelerator, model, tokenizer, args.output_dir, progress.step, state(), args.lora,
                            args.save_total_limit))
                    summary = _summary(args, task, progress, accelerator, attention, untimed, started, first_step_at,
                                       resumed_from, checkpoint=saved_at[1], interrupted=True)
                    _write_summary(args, summary, accelerator)
                    accelerator.print(f"stopped after step {progress.step} of {total_steps}: checkpoint saved to "
                                      f"{saved_at[1]}; continue with the same command and --resume")
                    accelerator.end_training()
                    raise SystemExit(stop.exit_status)
                if progress.step >= total_steps:
                    break
            else:
                if progress.step == steps_before:
                    fail(f"an epoch of {len(train_loader)} batches made no optimizer step")  # guarded above
                progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
    bar.close()

    final_dir = os.path.join(args.output_dir, "final")
    checkpointing.write_atomically(accelerator, final_dir, lambda directory: checkpointing.save_model(
        accelerator, model, tokenizer, directory, args.lora))
    summary = _summary(args, task, progress, accelerator, attention, untimed, started, first_step_at, resumed_from,
                       checkpoint=final_dir, interrupted=False)
    _write_summary(args, summary, accelerator)
    accelerator.print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "train_loss_per_step")},
                                 indent=2))
    accelerator.print(task.verdict(summary))
    accelerator.end_training()
    return summary


def _summary(args, task, progress, accelerator, attention, untimed, started, first_step_at, resumed_from,
             checkpoint, interrupted):
    gpu_mib, rss_mib = peak_memory()
    last = progress.history[-1] if progress.history else None
    return {
        "script": task.name,
        "model": args.model or "built-in config (from scratch)",
        "data": args.train_file or "built-in task",
        "attn_implementation": args.attn,
        "attention_ran": attention,
        "sparsity": args.sparsity,
        "max_length": args.max_length,
        "lora": args.lora,
        "gradient_checkpointing": args.gradient_checkpointing,
        "mixed_precision": args.mixed_precision,
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "steps": progress.step,
        "interrupted": interrupted,
        "resumed_from": resumed_from,
        "batch_size_per_device": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "final_train_loss": progress.train_losses[-1] if progress.train_losses else None,
        "eval": last,
        "chance_accuracy": task.chance_accuracy,
        "history": progress.history,  # every evaluation: step, train loss, eval metrics
        "train_loss_per_step": progress.train_losses,
        "train_tokens": progress.tokens,
        "train_seconds": progress.train_time,  # after the first `untimed` optimizer steps
        "untimed_warmup_steps": untimed,
        "tokens_per_second": progress.tokens / progress.train_time if progress.train_time else None,
        "seconds_to_first_step": first_step_at - started if first_step_at else None,  # from the script's start
        "wall_seconds": time.time() - started,
        "peak_gpu_memory_mib": gpu_mib,
        "peak_process_rss_mib": rss_mib,
        "checkpoint": checkpoint,
    }


def _write_summary(args, summary, accelerator):
    if accelerator.is_main_process:
        path = os.path.join(args.output_dir, "summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(path + ".tmp", path)
