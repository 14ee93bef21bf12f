"""The demo's last step: replies of the base tiny model and of the merged model, side by side, to
prompts from the training set, so the user sees that the chain trained something.

    python scripts/demo_compare.py --merged outputs/demo/merged --data data/demo_alpaca.json --n 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def describe(first: float, last: float, steps: int, eval_loss: float, eval_ppl: float, n_eval: int) -> str:
    """What the demo's numbers mean, computed from them: the README quotes this text and a test
    checks the two agree (the README once said eval loss near 12 beside a printed 16.03)."""
    millions = round(eval_ppl / 1e6)
    ppl = f"about {millions} million" if millions >= 1 else f"about {eval_ppl:,.0f}"
    return (f"The train loss fell from {first:.2g} to {last:.1g} in {steps} steps: the "
            f"model memorised its 8 replies. On {n_eval} conversations it never saw, its eval loss is "
            f"{eval_loss:.2g} (perplexity {ppl}), above the ln(151,936) = 11.9 of a uniform guess: a random-weight "
            "model 64 units wide can memorise, not generalise. A real Qwen3 starts near loss 1-2.")


def run_numbers(run: Path) -> tuple[float, float, int, float, float, int]:
    """(first and last train loss, steps, eval loss, eval perplexity, eval examples) of the demo's
    run and its eval."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ev = json.loads((run / "eval" / "eval.json").read_text())  # eval writes beside final/
    logged = [r for r in rows if "loss" in r]
    return logged[0]["loss"], logged[-1]["loss"], logged[-1]["step"], ev["loss"], ev["perplexity"], ev["examples"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="tiny-qwen3")
    ap.add_argument("--merged", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--out", help="also write the rows here as JSON")
    ap.add_argument("--run", help="the demo's run folder: its metrics.jsonl and eval/eval.json are described")
    a = ap.parse_args()

    from sftkit.config import SFTConfig
    from sftkit.data.prepare import load_conversations, resolve_sources
    from sftkit.evaluate import load_for_eval
    from sftkit.generate import generate, split_prompt
    from sftkit.quiet import quiet_third_party

    quiet_third_party()
    cfg = SFTConfig(data_path=[a.data])
    opts = cfg.data_options()
    pairs = [split_prompt(m) for m in load_conversations(resolve_sources(cfg.data_path, opts), opts).convs[:a.n]]
    replies = {}
    for name, path in (("base", a.base), ("merged", a.merged)):
        model, tokenizer = load_for_eval(path, cfg)
        replies[name] = generate(model, tokenizer, [p for p, _ in pairs], 48, opts.template_switches(), False, 1.0, 1.0,
                                 a.n, "cpu")
    rows = [{"prompt": p[-1]["content"], "trained_reply": ref, "base": b, "merged": m}
            for (p, ref), b, m in zip(pairs, replies["base"], replies["merged"])]
    table = Table(title="prompts from the training set: the base model vs the merged (fine-tuned) model")
    for col in ("prompt", "trained reply", "base tiny-qwen3", "merged"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["prompt"], r["trained_reply"], r["base"][:80], r["merged"])
    con = Console()
    con.print(table)
    same = sum(r["merged"] == r["trained_reply"] for r in rows)
    con.print(f"the merged model reproduces {same} of {len(rows)} trained replies exactly; the base model "
              f"{sum(r['base'] == r['trained_reply'] for r in rows)}.", highlight=False)
    if a.run:
        con.print(describe(*run_numbers(Path(a.run))), highlight=False)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
