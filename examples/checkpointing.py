"""Checkpoints that are complete or absent, and a graceful stop on SIGINT / SIGTERM.

A checkpoint `<output-dir>/checkpoint-<step>/` holds
    config.json, model.safetensors, tokenizer files   the model as `from_pretrained` loads it (LoRA: merged)
    adapter/                                          with --lora: the adapter alone (PeftModel.from_pretrained)
    training_state/                                   Accelerate's save_state: weights, optimizer, scheduler,
                                                      RNG states, the loop's position (step, epoch, batch)
    trainer_state.json                                written last: step, history, the run's arguments
It is written into `.tmp-checkpoint-<step>/` and renamed when complete, so a kill during a save leaves a temporary
directory (removed by the next run), never a half checkpoint. Saved files get the usual 0644 / 0755 modes (the
safetensors and temporary-directory writers create 0600 / 0700).
"""

import json
import os
import re
import shutil
import signal

from options import fail

PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-"
STATE_DIR = "training_state"
STATE_FILE = "trainer_state.json"
# Arguments a resumed run must share with the run it continues, or its batches and updates would differ.
RESUME_MUST_MATCH = ("model", "max_length", "doc_length", "attn", "sparsity", "lora", "lora_r", "batch_size",
                     "grad_accum", "seed", "train_file", "train_size", "num_processes")


def make_readable(directory):
    """Gives `directory` and everything under it the modes a plain `open` would have (0644 files and 0755
    directories under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def complete_checkpoints(output_dir):
    """[(step, path)] of the complete checkpoints in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(re.escape(PREFIX) + r"(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_temporaries(output_dir):
    """Temporary directories that a killed save left behind."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(TEMP_PREFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def resume_path(resume, output_dir):
    """The checkpoint `--resume` names: a checkpoint directory, a run directory (its newest checkpoint), or
    "latest" (the newest in --output-dir)."""
    directory = output_dir if resume == "latest" else resume
    if os.path.isfile(os.path.join(directory, STATE_FILE)):
        return directory
    found = complete_checkpoints(directory)
    if not found:
        where = f"--output-dir {output_dir}" if resume == "latest" else resume
        fail(f"--resume: no complete checkpoint in {where} (a checkpoint directory holds {STATE_FILE})")
    return found[-1][1]


def read_state(path):
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def check_resumable(path, run_args):
    """Ends the run if the checkpoint was written by a run with different data, batches or model."""
    saved = read_state(path)["args"]
    differ = [f"--{key.replace('_', '-')} {saved.get(key)!r} there, {run_args.get(key)!r} here"
              for key in RESUME_MUST_MATCH if saved.get(key) != run_args.get(key)]
    if differ:
        fail(f"--resume {path}: written by a different run ({'; '.join(differ)}); give the same arguments")


def write_atomically(accelerator, path, write):
    """Runs `write(temporary directory)` on every process (Accelerate's save_state needs all of them), then
    renames the directory to `path` on the main process, replacing an older `path`."""
    parent, name = os.path.split(path)
    temporary = os.path.join(parent, TEMP_PREFIX + name)
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    write(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        make_readable(temporary)
        if os.path.exists(path):
            stale = os.path.join(parent, TEMP_PREFIX + "old-" + name)
            os.rename(path, stale)
            os.rename(temporary, path)
            shutil.rmtree(stale)
        else:
            os.rename(temporary, path)
    accelerator.wait_for_everyone()
    return path


def save_model(accelerator, model, tokenizer, directory, lora):
    """The model as `AutoModelFor...from_pretrained(directory)` loads it, with plain transformers; with --lora the
    adapters are merged into a copy of the weights for it, and the adapter alone (with the trained position table,
    if extended) goes to `directory/adapter`. Main process only."""
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    if lora:
        import copy
        unwrapped.save_pretrained(os.path.join(directory, "adapter"))
        unwrapped = copy.deepcopy(unwrapped).merge_and_unload()
    unwrapped.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_checkpoint(accelerator, model, tokenizer, output_dir, step, state, lora, keep):
    """checkpoint-<step> (model, adapter, Accelerate training state, trainer_state.json), then rotation down to the
    newest `keep` checkpoints (0: keep all). Returns its path."""
    def write(directory):
        accelerator.save_state(os.path.join(directory, STATE_DIR))
        save_model(accelerator, model, tokenizer, directory, lora)
        if accelerator.is_main_process:
            with open(os.path.join(directory, STATE_FILE), "w") as f:
                json.dump(state, f, indent=2)

    path = write_atomically(accelerator, os.path.join(output_dir, f"{PREFIX}{step}"), write)
    if accelerator.is_main_process and keep:
        for _, old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGINT and SIGTERM set `stop.signal` instead of killing the run, so the
    loop can finish its step and save; a second signal acts as usual (Ctrl-C twice stops at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce=print):
        self.signal, self.announce, self.previous = None, announce, {}

    def _handle(self, signum, frame):
        self.signal = signum
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.announce(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                      f"(send it again to stop at once)")

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def exit_status(self):
        """128 + the signal number, the shell's convention for a run ended by a signal (130: SIGINT)."""
        return 128 + (self.signal or signal.SIGINT)
