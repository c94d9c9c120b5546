"""The classification job's comparison: the same model fine-tuned on whole documents and on their first N tokens,
side by side in the terminal, in comparison.json and as comparison.png (both learning curves)."""

import json
import os


def side_by_side(runs):
    """runs: [(label, summary)] -> the printed table."""
    header = f"{'':<24}" + "".join(f"{label:>22}" for label, _ in runs)
    rows = [header]

    def row(name, values):
        rows.append(f"{name:<24}" + "".join(f"{v:>22}" for v in values))

    row("tokens seen per document", [str(s["max_length"]) for _, s in runs])
    row("eval accuracy", [f"{s['eval']['eval_accuracy']:.1%}" for _, s in runs])
    row("best eval accuracy", [f"{max(h['eval_accuracy'] for h in s['history']):.1%}" for _, s in runs])
    row("eval loss", [f"{s['eval']['eval_loss']:.4f}" for _, s in runs])
    row("final train loss", [f"{s['final_train_loss']:.4f}" for _, s in runs])
    row("train seconds", [f"{s['train_seconds']:.1f}" for _, s in runs])
    row("attention", [s["attention_ran"].split(" (")[0] for _, s in runs])
    rows.append(f"chance: {runs[0][1]['chance_accuracy']:.0%} (the evidence lies past the first "
                f"{runs[-1][1]['max_length']} tokens)")
    return "\n".join(rows)


def plot(runs, path):
    """Train loss per step and eval accuracy at each evaluation, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, summary in runs:
        losses = summary["train_loss_per_step"]
        window = max(1, len(losses) // 40)  # a running mean: single micro-batch losses swing widely
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        loss_ax.plot(range(1, len(losses) + 1), smooth, label=label)
        history = summary["history"]
        acc_ax.plot([h["step"] for h in history], [h["eval_accuracy"] for h in history], marker="o", label=label)
    chance = runs[0][1]["chance_accuracy"]
    acc_ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.0%})")
    loss_ax.set(xlabel="optimizer step", ylabel="train loss (running mean)", yscale="log", title="training")
    acc_ax.set(xlabel="optimizer step", ylabel="eval accuracy", ylim=(0, 1.02), title="evaluation")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{runs[0][1]['model']}: whole documents vs the first {runs[-1][1]['max_length']} tokens",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(runs, output_dir, print_fn=print):
    """Prints the table, writes comparison.json and comparison.png into `output_dir`; returns the json dict."""
    print_fn(side_by_side(runs))
    png = os.path.join(output_dir, "comparison.png")
    plot(runs, png)
    result = {"runs": {label: {"max_length": s["max_length"], "eval_accuracy": s["eval"]["eval_accuracy"],
                               "history": s["history"], "summary": os.path.join(os.path.dirname(s["checkpoint"]),
                                                                                "summary.json")}
                       for label, s in runs},
              "plot": png}
    with open(os.path.join(output_dir, "comparison.json"), "w") as f:
        json.dump(result, f, indent=2)
    print_fn(f"learning curves: {png}")
    return result
