"""What `pip install -e .` and `pip install -e ".[test]"` bring: the distributions in the
dependency closure of tritonkv (with the extras asked for), resolved from the metadata of
the running environment, and the bytes their installed files take (sizes from disk, files
from each distribution's RECORD). Run it in a venv that has `.[test]` installed; the base
install's closure is a subset, measured from the same metadata.

    python bench/install_footprint.py --out bench/results/install_footprint.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def closure(root: str, extras: set[str]) -> dict[str, metadata.Distribution]:
    """Installed distributions ``root``[extras] needs, transitively (by canonical name)."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, frozenset]] = set()  # (name, extras) already expanded
    todo = [(canonicalize_name(root), frozenset(extras))]
    env = default_environment()
    while todo:
        key, wanted = todo.pop()
        if (key, wanted) in seen:
            continue
        seen.add((key, wanted))
        try:
            dist = found.get(key) or metadata.distribution(key)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{key} is needed but not installed here") from None
        found[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(
                    req.marker.evaluate({**env, "extra": e}) for e in (wanted or {""})):
                continue
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return found


def size(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        path = f.locate()
        if os.path.isfile(path):
            total += os.path.getsize(path)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "install_footprint.md"))
    args = ap.parse_args()
    command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    rows = []
    for label, extras in (("`pip install -e .` (serving)", set()), ('`pip install -e ".[test]"`', {"test"})):
        dists = closure("tritonkv", extras)
        sizes = {k: size(d) for k, d in dists.items()}
        biggest = sorted(sizes, key=sizes.get, reverse=True)[:3]
        rows.append(f"| {label} | {len(dists)} | {sum(sizes.values()) / 1e9:.2f} GB | "
                    + ", ".join(f"{k} {dists[k].version} {sizes[k] / 1e6:.0f} MB" for k in biggest) + " |")
    lines = ["# Install footprint", "", f"Command: `{command}`  ",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; Python "
             f"{sys.version.split()[0]}; environment {sys.prefix}", "",
             "Distributions in tritonkv's dependency closure (tritonkv itself included) and the size of "
             "their installed files (the versions installed in the environment named above); pip and the venv's own files are not counted.", "",
             "| install | distributions | installed size | largest |", "|---|---:|---:|---|", *rows, ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
