"""SelectionReport: what each round of self-training selected, in TensorBoard.

At the start of each round's training, from the data module's `RoundReport` (`datamodules/self_generated.py`):
histograms of every signal, the kept fraction, the audit (each selector's kept-set precision and recall against
gold, where the task has gold; never used for training) and a few kept samples as text. Keys:
`select/kept_fraction`, `select/<selector>/precision|recall|kept`.
"""

from __future__ import annotations

import lightning as L


class SelectionReport(L.Callback):
    def __init__(self, num_text_rows: int = 4) -> None:
        self.num_text_rows = num_text_rows
        self._logged_round = -1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        reports = getattr(trainer.datamodule, "reports", None)
        if reports is None:
            raise TypeError(f"SelectionReport reads a self-training data module's round reports; "
                            f"{type(trainer.datamodule).__name__} has none")
        if not reports or reports[-1].round == self._logged_round or trainer.logger is None:
            return
        report = reports[-1]
        self._logged_round = report.round
        step = trainer.global_step
        metrics = {"select/kept_fraction": report.kept_fraction, "select/parsed_fraction": report.parsed_fraction}
        for s in report.selectors:
            name = s["name"].replace(" ", "_")
            metrics |= {f"select/{name}/precision": s["precision"], f"select/{name}/recall": s["recall"],
                        f"select/{name}/kept": s["kept"]}
        trainer.logger.log_metrics(metrics, step=step)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_histogram"):
            for key, values in report.signals.items():
                finite = values[values.isfinite()] if values.is_floating_point() else values
                if finite.numel():
                    experiment.add_histogram(f"select/{key}", finite, step)
        if hasattr(experiment, "add_text"):
            rows = report.samples[: self.num_text_rows]
            text = "\n\n".join(f"weight {weight:.2f}: `{completion!r}`" for weight, completion in rows)
            experiment.add_text("select/samples", text, step)
