"""Writes a GPT-2-small-sized checkpoint (124M parameters, 1024 positions) with a tokenizer into a local directory,
for running finetune_lm.py past GPT-2's position table on a machine that cannot download `gpt2`:

    python examples/make_gpt2_checkpoint.py runs/gpt2-small-1024
    accelerate launch examples/finetune_lm.py --model runs/gpt2-small-1024 --max-length 8192 --lora \\
        --gradient-checkpointing

The weights are GPT-2's initialisation (seeded), not OpenAI's: what the run shows is the 1024 -> 8192 extension
and LoRA training the new position rows, not pretrained knowledge. With `--source DIR` (a local copy of `gpt2`,
or any GPT-2 checkpoint) its weights and tokenizer are re-saved instead. The generated tokenizer is a word-level
one over GPT-2's vocabulary size (ids 1..50255 are the words "t1".."t50255", 50256 is <|endoftext|>); the
built-in tasks map their synthetic ids onto it and never tokenize text.
"""

import argparse
import os


def synthetic_tokenizer(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab_size - 1)}, "<|endoftext|>": vocab_size - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", model_max_length=1024)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where to write the checkpoint")
    parser.add_argument("--source", default=None,
                        help="a local GPT-2 checkpoint to re-save instead of a fresh initialisation")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initialisation (default: 0)")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    transformers.utils.logging.disable_progress_bar()
    if args.source is not None:
        model = GPT2LMHeadModel.from_pretrained(args.source)
        tokenizer = AutoTokenizer.from_pretrained(args.source)
    else:
        torch.manual_seed(args.seed)
        model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers, 768 wide, 12 heads, 1024 positions
        tokenizer = synthetic_tokenizer(model.config.vocab_size)
    os.makedirs(args.directory, exist_ok=True)
    model.save_pretrained(args.directory)
    tokenizer.save_pretrained(args.directory)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(args.directory):  # safetensors writes 0600; a shared checkpoint should be readable
        os.chmod(os.path.join(args.directory, name), 0o666 & ~umask)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.directory}: GPT-2, {parameters / 1e6:.0f}M parameters, {model.config.n_positions} positions")


if __name__ == "__main__":
    main()
