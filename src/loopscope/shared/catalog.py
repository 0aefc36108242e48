"""Torch-free facts the UI and `--help` need about the built-in scenarios (stage ids: `vocab`)."""

from __future__ import annotations

from dataclasses import dataclass

from loopscope.shared.vocab import Task


@dataclass(frozen=True)
class ScenarioInfo:
    """A built-in experiment: where its factory lives and what it teaches."""

    name: str
    description: str
    task: Task
    factory: str  # "module:function", imported only in the engine process
    # What the experiment is made of (`loopscope.engine.features` computes the same from the
    # experiment itself; a test keeps the two equal). Decides which bugs apply.
    features: frozenset[str] = frozenset()

    @property
    def bugs(self) -> list[str]:
        from loopscope.shared.bugs import applicable

        return applicable(self.features)


SCENARIOS: dict[str, ScenarioInfo] = {
    info.name: info
    for info in (
        ScenarioInfo(
            "blobs",
            "1000 rows x 10 normalised features in two overlapping blobs, batches of 10; "
            "an MLP with ReLU and one logit, BCEWithLogitsLoss, SGD",
            Task.BINARY,
            "loopscope.scenarios.blobs:experiment",
            frozenset(
                {
                    "binary_logits",
                    "relu",
                    "no_batchnorm",
                    "mlp",
                    "multi_feature_inputs",
                    "labels",
                    "validation",
                    "float_inputs",
                    "tensor_inputs",
                    "hidden_layers",
                    "map_dataset",
                }
            ),
        ),
        ScenarioInfo(
            "spirals",
            "3 interleaved spirals in 2-D; an MLP with dropout, CrossEntropyLoss, Adam, with the "
            "careful loop: gradient clipping, LR scheduler, best checkpoint, early stopping",
            Task.CLASSIFICATION,
            "loopscope.scenarios.spirals:experiment",
            frozenset(
                {
                    "classification",
                    "relu",
                    "no_batchnorm",
                    "mlp",
                    "multi_feature_inputs",
                    "dropout",
                    "train_eval_differs",
                    "scheduler",
                    "clip_grad",
                    "checkpoint",
                    "labels",
                    "validation",
                    "float_inputs",
                    "tensor_inputs",
                    "hidden_layers",
                    "map_dataset",
                }
            ),
        ),
        ScenarioInfo(
            "regression",
            "fit a noisy 1-D curve with an MLP and MSELoss, Adam",
            Task.REGRESSION,
            "loopscope.scenarios.regression:experiment",
            frozenset(
                {
                    "regression_column",
                    "no_batchnorm",
                    "mlp",
                    "validation",
                    "float_inputs",
                    "tensor_inputs",
                    "hidden_layers",
                    "map_dataset",
                }
            ),
        ),
        ScenarioInfo(
            "digits",
            "8x8 images of the digits 0-9 drawn locally; a small CNN with batch norm, "
            "CrossEntropyLoss, SGD with momentum",
            Task.CLASSIFICATION,
            "loopscope.scenarios.digits:experiment",
            frozenset(
                {
                    "classification",
                    "relu",
                    "batchnorm",
                    "train_eval_differs",
                    "multi_feature_inputs",
                    "labels",
                    "validation",
                    "float_inputs",
                    "tensor_inputs",
                    "hidden_layers",
                    "map_dataset",
                }
            ),
        ),
        ScenarioInfo(
            "amp",
            "the blobs data trained as large models are: fp16 autocast with a GradScaler, gradients "
            "accumulated over 4 micro-batches of 10, clipping; SGD",
            Task.BINARY,
            "loopscope.scenarios.amp:experiment",
            frozenset(
                {
                    "binary_logits",
                    "relu",
                    "no_batchnorm",
                    "mlp",
                    "multi_feature_inputs",
                    "labels",
                    "validation",
                    "float_inputs",
                    "tensor_inputs",
                    "hidden_layers",
                    "map_dataset",
                    "clip_grad",
                    "accumulation",
                    "fp16_scaler",
                }
            ),
        ),
    )
}
DEFAULT_SCENARIO = "blobs"
