"""sweep: conversions outside DVC as a Hydra multirun, each job's result cached by content (export/sweep.py).

    python -m stages.sweep -m model=demo-mini recipe=pal4g recipe.group_size=8,16,32 [hydra/launcher=local]

Not a DVC stage: conf/sweep.yaml composes one job (a model and a recipe from conf/'s groups, and
conf/conversion.yaml); Hydra's launchers run the jobs one by one, in parallel (local) or on SLURM (slurm).
When they are done, artifacts/sweeps/report.md and tradeoff.png show size vs PSNR over every result so far.
"""

import multiprocessing
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from voxtral_coreml.export.sweep import SweepJob, run_job
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import sweeps_dir
from voxtral_coreml.pipeline.runner import configure_logging
from voxtral_coreml.report.table import write_sweeps_report


@hydra.main(config_path="../conf", config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    configure_logging()  # Hydra set up the handlers; this quiets coremltools' and torch's per-op lines
    if multiprocessing.get_start_method(allow_none=True) not in multiprocessing.get_all_start_methods():
        # A joblib (loky) worker's default is "loky", which the processes it spawns (the mixed scan's k-means
        # workers) re-apply on start-up and cannot resolve.
        multiprocessing.set_start_method("spawn", force=True)
    hydra_cfg = HydraConfig.get()
    try:
        job = SweepJob.from_config(
            OmegaConf.to_container(cfg, resolve=True), hydra_cfg.runtime.choices, list(hydra_cfg.overrides.task)
        )
        # The launch directory, wherever the launcher runs the job (a pool worker, a SLURM node).
        return run_job(job, Path(hydra_cfg.runtime.cwd) / sweeps_dir())
    except VoxtralError as e:
        # Hydra prints a CompactHydraException as its message alone: one line, like every other entry point.
        raise CompactHydraException(f"error: {e}") from None


class SweepsReport(Callback):
    """conf/sweep.yaml's hydra.callbacks: the sweeps' report, re-rendered once the jobs are done (on the machine
    that launched them, whichever launcher ran them)."""

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._render()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._render()

    @staticmethod
    def _render() -> None:
        write_sweeps_report(lookup(load_params(), "pipeline"))  # the pipeline's packages join the chart


if __name__ == "__main__":
    main()
