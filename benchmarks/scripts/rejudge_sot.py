"""Judge a saved Skeleton-of-Thought run again: the answers of a `bench survey data --workloads sot` results.json,
read by the judge of its config (or `--judge`), with the verdicts and position-balanced preference of the
current survey_sot. Writes the run's results.json with the new verdicts and its report's SoT section to
`--output`; the answers and timings are the saved run's.

Usage: python benchmarks/scripts/rejudge_sot.py RESULTS_JSON --output DIR [--judge MODEL] [--threads 2]
"""

import argparse
import json
from pathlib import Path

from nimblelm import LLM
from nimblelm.bench import survey_sot
from nimblelm.bench.machine import cpu_features, cpu_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--judge")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=8192)
    args = p.parse_args()
    report = json.loads(args.results.read_text())
    cfg = report["config"]
    judge_name = args.judge or cfg["judge"]
    judge = LLM(judge_name, dtype=cfg.get("dtype") or "auto", num_threads=args.threads,
                max_model_len=args.max_model_len)
    for row in report["sot"]["questions"]:
        row["verdicts"], row["preference"] = survey_sot.judge_answers(judge, row) if row["routed"] else ([], None)
    report["rejudged"] = {"from": str(args.results), "judge": judge_name, "precision": judge.llm_engine.precision,
                          "machine": f"{cpu_model()} ({' '.join(cpu_features())}), {args.threads} threads"}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(report, indent=1))
    lines = [(f"Judged again from `{args.results}` by {judge_name} ({judge.llm_engine.precision}) on "
              f"{report['rejudged']['machine']}; answers and timings are the saved run's."),
             *survey_sot.sot_markdown(report), "", *survey_sot.sot_targets(report)]
    (args.output / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
