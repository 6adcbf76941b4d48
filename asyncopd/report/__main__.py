"""``python -m asyncopd.report runs/<sweep> [--baseline key=value[,key=value]] [--level 0.95]``."""

from __future__ import annotations

import argparse
import sys

from asyncopd.report import ReportError, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncopd.report", description=__doc__)
    parser.add_argument("sweep_dir", help="the directory a sweep wrote (runs/<run.name>)")
    parser.add_argument("--baseline", default=None,
                        help="key=value[,key=value]: the combination(s) to compare against (default: the first)")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dir, baseline=args.baseline, level=args.level)
    except (ReportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report.console_lines()))
    print(f"report: {report.base / 'report.md'} ({len(report.plots)} plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
