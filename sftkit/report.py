"""Rich tables: what prepare-data kept and dropped, what eval measured, what is trained."""

from __future__ import annotations

from pathlib import Path


def print_manifest(m: dict, out: Path, con) -> None:
    from rich.table import Table

    t = Table(title=f"prepared data: {out}" + ("  (cached: unchanged inputs)" if m.get("cached") else ""))
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("rows read", f"{m['rows_in']:,}")
    t.add_row("examples kept", f"{m['examples_kept']:,}")
    for reason, n in m["dropped"].items():
        t.add_row(f"dropped: {reason}", f"{n:,}")
    for kind, n in (m.get("warnings") or {}).items():
        if n:  # kept as the template renders them, but worth a look (e.g. replies that say nothing)
            t.add_row(f"[yellow]kept, warning: {kind}[/yellow]", f"{n:,}")
    for mx in m.get("mixing") or []:
        t.add_row(f"weight {mx['weight']:g}: {mx['data_path']}", f"{mx['examples']:,} -> {mx['after_weighting']:,}")
    if m.get("mixing"):
        t.add_row("examples saved (after weighting)", f"{m['examples_saved']:,}")
    if m.get("images"):
        shown = m["images"]
        t.add_row("examples with images", f"{shown['examples_with_images']:,}")
        t.add_row("images (distinct, stored)", f"{shown['images']:,} ({shown['stored']:,}, {shown['bytes'] / 2**20:,.1f} MB)")
    t.add_row("tokens", f"{m['tokens']:,}")
    t.add_row("supervised tokens", f"{m['supervised_tokens']:,} ({m['supervised_tokens'] / max(m['tokens'], 1):.0%})")
    for k, v in m["length"].items():
        t.add_row(f"length {k}", f"{v:,}")
    t.add_row("seconds", f"{m['seconds']}")
    con.print(t)
    for line in m.get("bad_rows_first", []):
        con.print(f"[yellow]skipped: {line}[/yellow]", highlight=False)


def print_eval(result: dict, path: Path, con) -> None:
    from rich.table import Table

    t = Table(title=f"eval: {result['model']}")
    for col in ("loss", "perplexity", "supervised tokens", "examples"):
        t.add_column(col, justify="right")
    t.add_row(f"{result['loss']:.4f}", f"{result['perplexity']:.3f}", f"{result['supervised_tokens']:,}",
              f"{result['examples']:,}")
    con.print(t)
    if "generation" in result:
        g = result["generation"]
        con.print(f"generation on {result['num_samples']} prompts: exact match {g['exact_match']:.3f}, "
                  f"token F1 {g['token_f1']:.3f}, ROUGE-L {g['rouge_l']:.3f} (samples.jsonl)")
    con.print(f"written to {path}")


def print_examples(dataset, tokenizer, n: int, con) -> None:
    """Each example's text with the supervised tokens in green: exactly what the loss sees."""
    from rich.text import Text

    from sftkit.data.render import IGNORE_INDEX

    for i in range(min(n, len(dataset))):
        row = dataset[i]
        text = Text()
        ids, labels = row["input_ids"], row["labels"]
        image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        at = 0
        while at < len(ids):
            piece = tokenizer.decode([ids[at]])
            run = 1
            if "images" in row:  # an image's tokens: one placeholder shown with its count
                while at + run < len(ids) and ids[at + run] == ids[at] and piece == image_token:
                    run += 1
            text.append(piece if run == 1 else f"{piece} x {run}",
                        style="bold green" if labels[at] != IGNORE_INDEX else "dim")
            at += run
        con.rule(f"example {i}: {len(row['input_ids'])} tokens, "
                 f"{sum(lab != IGNORE_INDEX for lab in row['labels'])} supervised (green)")
        con.print(text)


def plot_losses(metrics: Path, path: Path) -> None:
    """loss.png: train loss (and eval loss where measured) against step."""

    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    from sftkit.metrics import read_jsonl

    rows, _ = read_jsonl(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4477aa")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#cc3311")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token-mean loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
