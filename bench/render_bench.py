"""CPU time of rendering alone, a row: transformers' `apply_chat_template(..., tokenize=False)`
against sftkit/data/template.py, on the same conversations, no profiler.

The rows are bench/prepare_profile.py's: the `plain` conversations of bench/synthetic.py (OpenAI
`messages`, 1-4 turns, a system prompt in ~10%), with sftkit's message preparation (escapes) done
once outside the clock. The two are timed in turns, `--rounds` times each, and the fastest round of
each is kept: on a shared machine the fastest is the one least disturbed. Every text is checked
equal first.

    .venv/bin/python -m bench.render_bench --n 2000
"""

from __future__ import annotations

import argparse
import os
import time

from bench import synthetic
from bench.child import offline


def cpu_ms_a_row(render, rows) -> float:
    start = time.process_time()
    for msgs in rows:
        render(msgs)
    return (time.process_time() - start) / len(rows) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    offline()
    from transformers import AutoTokenizer

    from sftkit.data.render import RenderOptions, prepare_messages, template_spec
    from sftkit.data.template import apply
    from sftkit.models import bundled_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    spec = template_spec(tok)
    rows = [prepare_messages(conv["messages"], RenderOptions(), spec.escapes)
            for conv in synthetic.rows(synthetic.plain, a.n, a.seed)]
    tools = {
        "transformers apply_chat_template": lambda msgs: tok.apply_chat_template(msgs, tokenize=False),
        "sftkit template.apply": lambda msgs: apply(tok, msgs),
    }
    same = sum(tok.apply_chat_template(msgs, tokenize=False) == apply(tok, msgs) for msgs in rows)
    best = dict.fromkeys(tools, float("inf"))
    for _ in range(a.rounds):
        for name, render in tools.items():
            best[name] = min(best[name], cpu_ms_a_row(render, rows))
    print(f"{a.n} rows, {same} texts equal; fastest of {a.rounds} rounds, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    for name, ms in best.items():
        print(f"{name:<36} {ms:.3f} CPU-ms a row")


if __name__ == "__main__":
    main()
