"""The one markdown table writer of the bench scripts' results files and the README block."""

from __future__ import annotations


def table(columns: list[str], rows: list[list], right: tuple[int, ...] = ()) -> list[str]:
    """Lines of a markdown table: ``columns`` are the header cells, each row a list of cells
    (written with ``str``), ``right`` the indices of right-aligned (numeric) columns."""
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(columns))) + "|"]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row of {len(row)} cells under {len(columns)} columns: {row}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines


def publish(lines: list[str], out: str | None) -> None:
    """Print a results file's lines and, when ``out`` names a file, write them there."""
    text = "\n".join(lines)
    print(text, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
