"""Compare two Dice-per-click reports of the same clicks, sequence by sequence.

    python benchmarks/compare_dice.py BASE.json OTHER.json

The reports come from ``fastsam3d eval --json`` or ``benchmarks/session_dice.py --json`` on the
same data, protocol and seeds. Sequences pair by case, structure and seed
(:func:`fastsam3d.evaluation.paired_difference`). Per click the table shows the mean difference
(other - base), its standard error, the two-sided paired t-test's p-value, and how many
sequences moved by more than 0.2 either way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastsam3d.evaluation import paired_difference


def format_comparison(report: dict, large: float = 0.2) -> str:
    """``paired_difference``'s report (made with ``large``) as a markdown table, one row per
    click."""
    lines = [
        f"{report['sequences']} paired sequences",
        "",
        f"| click | other - base | standard error | p | better by > {large:g} "
        f"| worse by > {large:g} |",
        "|---|---|---|---|---|---|",
    ]
    for click, values in enumerate(
        zip(
            report["mean"],
            report["standard_error"],
            report["p_value"],
            report["better"],
            report["worse"],
            strict=True,
        ),
        start=1,
    ):
        mean, error, p_value, better, worse = values
        p_text = "-" if p_value is None else f"{p_value:.3f}"
        lines.append(f"| {click} | {mean:+.3f} | {error:.3f} | {p_text} | {better} | {worse} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base")
    parser.add_argument("other")
    parser.add_argument("--large", type=float, default=0.2, help="what counts as a large move")
    args = parser.parse_args()
    reports = [json.loads(Path(path).read_text())["results"] for path in (args.base, args.other)]
    report = paired_difference(*reports, large=args.large)
    print(format_comparison(report, args.large))


if __name__ == "__main__":
    main()
