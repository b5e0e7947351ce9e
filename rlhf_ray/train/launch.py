"""The driver's side of the SFT and reward phases on Ray Train: each phase's loop entry point,
and the launch (the workers' settings: rlhf_ray/train/settings.py).

Nothing heavy is imported here: Ray Train unpickles the loop and its settings in its controller
too, which never runs the loop. A loop imported from rlhf_ray/train/sft.py loaded torch,
transformers and peft there (~7 s of CPU per phase, measured, before any worker started); the
entry points below import the phase's module when they run, on a worker.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from rlhf_ray.config import ResourcesConfig
from rlhf_ray.errors import RoleFailed
from rlhf_ray.run.console import quiet_libraries, ray_train_log_level, skip_bitsandbytes
from rlhf_ray.run.resources import bundle
from rlhf_ray.train.settings import RewardWorkerSettings, SFTWorkerSettings


def sft_loop(config: dict) -> None:
    """The SFT phase on one Ray Train worker: config {"settings": SFTWorkerSettings}."""
    before_model_libraries(config["settings"])
    from rlhf_ray.train.sft import sft_worker_loop

    sft_worker_loop(config)


def reward_loop(config: dict) -> None:
    """The reward phase on one Ray Train worker: config {"settings": RewardWorkerSettings}."""
    before_model_libraries(config["settings"])
    from rlhf_ray.train.reward import reward_worker_loop

    reward_worker_loop(config)


def before_model_libraries(settings: SFTWorkerSettings | RewardWorkerSettings) -> None:
    """Before the phase's module imports peft (and with it bitsandbytes): no bitsandbytes where
    nothing is quantised (console.skip_bitsandbytes; first, as transformers, which
    quiet_libraries imports, asks whether it is installed), then the libraries quieted."""
    skip_bitsandbytes(settings.quantization.load_in_4bit)
    quiet_libraries()


TRAIN_STORAGE = "ray_train"  # under output_dir: Ray Train's runs and epoch checkpoints


def train_storage(output_dir: Path, name: str) -> Path:
    """Where Ray Train keeps phase `name`'s run and epoch checkpoints until the phase is done."""
    return output_dir.resolve() / TRAIN_STORAGE / name


def launch(
    name: str,
    loop: Callable[[dict], None],
    loop_config: dict,
    res: ResourcesConfig,
    output_dir: Path,
) -> None:
    """Run `loop` on `res.train_workers` data-parallel Ray Train workers.

    A worker that dies restarts the group from the newest epoch checkpoint, up to
    `res.train_worker_restarts` times; past that, RoleFailed names the phase and the error. A
    rerun with the same output_dir continues from that checkpoint; once the phase is complete,
    its checkpoints are deleted.
    """
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    storage = train_storage(output_dir, name)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=res.train_workers,
            use_gpu=res.train_worker_gpus > 0,
            resources_per_worker=bundle(res.train_worker_cpus, res.train_worker_gpus),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage.parent),
            failure_config=FailureConfig(max_failures=res.train_worker_restarts),
            # Ray Train deletes an old checkpoint only after a newer one is recorded.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level=ray_train_log_level()),
        ),
    )
    try:
        trainer.fit()
    except TrainingFailedError as err:
        raise RoleFailed(
            f"the {name} phase's Ray Train workers failed "
            f"{res.train_worker_restarts + 1} time(s) (resources.train_worker_restarts="
            f"{res.train_worker_restarts}); last error: {err}"
        ) from err
    shutil.rmtree(storage, ignore_errors=True)
