"""The main job: train a small GPT with a data mixer, compare mixers over paired seeds, write tables and plots.

    from aioli_ext.train import TrainConfig, train, compare
    result = train(TrainConfig(corpus="runs/corpus", groups=["code", "noise"], method="aioli", steps=1000))
    summary = compare(TrainConfig(corpus="runs/corpus", groups=["code", "noise"]), ["stratified", "aioli"],
                      seeds=range(5), jobs=2, out="runs/compare")

Command line: ``aioli-ext train|compare|study|prepare`` (see ``aioli_ext.__main__``).
"""
from .compare import compare, summarise, t_interval
from .config import METHODS, TrainConfig, load_config_file, validate
from .loop import Run, RunError, build_mixer, lr_at, train

__all__ = ["METHODS", "Run", "RunError", "TrainConfig", "build_mixer", "compare", "load_config_file", "lr_at",
           "summarise", "t_interval", "train", "validate"]
