"""report: one markdown table over every package in the pipeline, and package size vs PSNR per model
(artifacts/report.md, tradeoff.png, tradeoff/; params: pipeline).

`python -m stages.report --sweeps` renders the same size-vs-PSNR report over the pipeline's packages and every
sweep result into artifacts/sweeps/ (not DVC outputs: sweeps live outside DVC, see stages/sweep.py).
"""

import argparse

from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.runner import run
from voxtral_coreml.report.table import write_pipeline_report, write_sweeps_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweeps", action="store_true", help="the pipeline's packages and every sweep result")
    args = parser.parse_args()
    pipeline = lookup(load_params(), "pipeline")
    print(write_sweeps_report(pipeline) if args.sweeps else write_pipeline_report(pipeline))


if __name__ == "__main__":
    run(main)
