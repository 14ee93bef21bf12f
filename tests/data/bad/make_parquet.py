"""Write the Parquet files of the bad-input corpus (they are checked in; rerun after a change).

    .venv/bin/python tests/data/bad/make_parquet.py

What each one tests is in EXPECTED.json next to this script.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def write(name: str, table: pa.Table) -> None:
    pq.write_table(table, HERE / name, compression="NONE")


def alpaca(n: int) -> dict[str, list]:
    return {"instruction": [f"What is {i} + {i}?" for i in range(n)], "input": [""] * n,
            "output": [str(2 * i) for i in range(n)]}


def main() -> None:
    # Columns that fit no format at all, and columns that half-fit one (no 'output').
    write("wrong_schema.parquet", pa.table({"prompt_text": ["Hi", "Bye"], "reply": ["Hello", "Goodbye"]}))
    write("missing_output_column.parquet", pa.table({"instruction": ["Hi", "Bye"], "input": ["", ""]}))
    # The right column names with the wrong types.
    write("messages_as_string.parquet", pa.table({"messages": ["user: Hi / assistant: Hello", "user: a / assistant: b"]}))
    write("output_as_int.parquet", pa.table({"instruction": ["6 * 7?", "2 + 2?"], "output": [42, 4]}))
    # Row-level faults inside a well-typed table.
    cols = alpaca(4)
    cols["output"][2] = None
    write("null_output.parquet", pa.table(cols))
    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
             [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "OK"}],
             [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]]
    write("roles_out_of_order.parquet", pa.table({"messages": pa.array(convs, type=pa.list_(msg))}))
    # Files that are not Parquet, or not all of one.
    write("empty_rows.parquet", pa.table({k: pa.array([], pa.string()) for k in alpaca(0)}))
    (HERE / "garbage.parquet").write_bytes(b"this is not a parquet file\n" * 4)
    write("_whole.parquet", pa.table(alpaca(20)))
    whole = (HERE / "_whole.parquet").read_bytes()
    (HERE / "_whole.parquet").unlink()
    (HERE / "truncated.parquet").write_bytes(whole[: len(whole) // 2])


if __name__ == "__main__":
    main()
