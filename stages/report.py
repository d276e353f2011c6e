"""report: one markdown table over every package in the pipeline (params: pipeline)."""

from voxtral_coreml.atomic import write_text_atomic
from voxtral_coreml.params import load_params, lookup
from voxtral_coreml.paths import report_file
from voxtral_coreml.report import render_report
from voxtral_coreml.runner import run


def main() -> None:
    pipeline = lookup(load_params(), "pipeline")
    report = render_report(pipeline["models"], pipeline["recipes"], pipeline["mel"])
    write_text_atomic(report_file(), report)
    print(report)


if __name__ == "__main__":
    run(main)
