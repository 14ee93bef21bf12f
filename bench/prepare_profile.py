"""Where prepare-data's time goes, per row: cProfile of `prepare()` in one process (num_proc 1).

The data: OpenAI `messages` rows, 1-4 turns, a system prompt in ~10%, no reasoning (the `plain`
conversations of bench/synthetic.py). The profiler's clock is CPU time (time.process_time), the
steadier measure on a shared machine; a Rust call's figure sums the threads it ran on. One warm-up
prepare runs first, so imports are not counted.

    .venv/bin/python -m bench.prepare_profile --n 2000
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from bench import synthetic
from bench.child import offline

# (label, file suffix, function name): cumulative CPU time of each, per row
PER_ROW = [
    ("read and validate rows (load_conversations)", "sftkit/data/prepare.py", "load_conversations"),
    ("render + tokenize + mask (tokenize_all)", "sftkit/data/prepare.py", "tokenize_all"),
    ("  Rust encode_batch", "~", "<method 'encode_batch' of 'tokenizers.Tokenizer' objects>"),
    ("  transformers apply_chat_template", "tokenization_utils_base.py", "apply_chat_template"),
    ("  sftkit's render (sftkit/data/template.py)", "sftkit/data/template.py", "render"),
    ("    jinja2 template body", "<template>", "root"),
    ("      jinja2 sandbox attribute checks", "jinja2/sandbox.py", "getattr"),
    ("  split_pieces (cut at special tokens)", "sftkit/data/render.py", "split_pieces"),
    ("  _ids_and_labels (ids and mask)", "sftkit/data/render.py", "_ids_and_labels"),
    ("  prepare_messages (escape, reasoning)", "sftkit/data/render.py", "prepare_messages"),
]
ONCE = [
    ("template_spec (a second Rust tokenizer from JSON)", "sftkit/data/render.py", "template_spec"),
    ("tokenizer_fingerprint (backend to_str)", "sftkit/data/prepare.py", "tokenizer_fingerprint"),
    ("max_token_chars (get_vocab)", "sftkit/data/prepare.py", "max_token_chars"),
    ("_save_dataset", "sftkit/data/prepare.py", "_save_dataset"),
    ("_plot_lengths", "sftkit/data/prepare.py", "_plot_lengths"),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> tuple[float, int]:
    """(cumulative seconds, calls) of the function, summed over every entry that matches."""
    secs = calls = 0
    for (file, _, fn), (_, nc, _, ct, _) in stats.stats.items():
        if fn == name and file.endswith(suffix):
            secs, calls = secs + ct, calls + nc
    return secs, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=0, help="also print the N functions of most own time")
    a = ap.parse_args()
    offline()
    from transformers import AutoTokenizer

    from sftkit.data.options import DataOptions
    from sftkit.data.prepare import prepare
    from sftkit.models import bundled_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    work = Path(tempfile.mkdtemp(prefix="sftkit_profile_"))
    try:
        data = synthetic.write(work / "messages.jsonl", synthetic.rows(synthetic.plain, a.n, a.seed))
        opts = DataOptions(max_length=4096, num_proc=1)
        prepare(opts, [str(data)], work / "warm", tok)
        prof = cProfile.Profile(time.process_time)
        wall = time.perf_counter()
        prof.runcall(prepare, opts, [str(data)], work / "out", tok)
        wall = time.perf_counter() - wall
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats = pstats.Stats(prof)
    total = cumulative(stats, "sftkit/data/prepare.py", "prepare")[0]
    print(f"{a.n} rows: prepare {total:.2f} CPU-s under the profiler, {wall:.2f} s wall; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'per row':<52} {'CPU-ms':>7} {'calls/row':>9}")
    for label, suffix, name in PER_ROW:
        secs, calls = cumulative(stats, suffix, name)
        print(f"{label:<52} {secs / a.n * 1e3:>7.3f} {calls / a.n:>9.1f}")
    isinstance_calls = cumulative(stats, "~", "<built-in method builtins.isinstance>")[1]
    print(f"{'isinstance calls per row (all callers)':<52} {'':>7} {isinstance_calls / a.n:>9.1f}")
    print(f"{'once per prepare':<52} {'CPU-s':>7}")
    for label, suffix, name in ONCE:
        print(f"{label:<52} {cumulative(stats, suffix, name)[0]:>7.2f}")
    if a.top:
        stats.sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
