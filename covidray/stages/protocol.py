"""``covidray protocol``: train -> export -> evaluate on one labelled dataset, in one job.

The defaults are the paper's protocol (:class:`covidray.stages.train.TrainConfig`) and the
evaluation's (:class:`covidray.stages.evaluate.EvaluateConfig`); ``--run`` names the run
directory for both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from covidray.config import option, to_dict
from covidray.layout import RunLayout
from covidray.stages.evaluate import EvaluateConfig, evaluate_run
from covidray.stages.export import ExportConfig, export_run
from covidray.stages.train import TrainConfig, fit
from covidray.storage import Storage


@dataclass(frozen=True)
class ProtocolConfig:
    train: TrainConfig = option(factory=TrainConfig)
    evaluate: EvaluateConfig = option(factory=EvaluateConfig)


def run_protocol(config: ProtocolConfig, storage: Storage, ray_address: str | None = None) -> dict:
    run = config.train.run
    evaluate = dataclasses.replace(config.evaluate, run=run)
    storage.check(run, writable=True)
    storage.write_json(RunLayout(run).protocol_config,
                       to_dict(dataclasses.replace(config, evaluate=evaluate)))
    trained = fit(config.train, storage, ray_address)
    exported = export_run(ExportConfig(run=run), storage)
    return {"train": trained,
            "export": {k: v for k, v in exported.items() if k != "metadata"},
            "evaluation": evaluate_run(evaluate, storage, ray_address)}
