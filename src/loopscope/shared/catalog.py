"""Torch-free facts the UI and `--help` need: stage ids and the built-in scenarios."""

from __future__ import annotations

from dataclasses import dataclass

# One loop iteration, in order. Optional stages appear only when the experiment enables them.
CORE_STAGES: tuple[str, ...] = ("load_batch", "zero_grad", "forward", "loss", "backward", "step")
ITERATION_STAGES: tuple[str, ...] = (
    "load_batch", "zero_grad", "forward", "loss", "backward", "clip_grad", "step", "scheduler",
)
EPOCH_END_STAGES: tuple[str, ...] = ("validate", "scheduler", "checkpoint", "early_stop")
ALL_STAGES: tuple[str, ...] = ITERATION_STAGES + ("validate", "checkpoint", "early_stop")

STAGE_DESCRIPTIONS: dict[str, str] = {
    "load_batch": "take the next batch from the training loader and move it to the device",
    "zero_grad": "clear the gradients left over from the previous iteration",
    "forward": "run the model on the inputs to get its outputs",
    "loss": "compare the outputs with the targets: one number to make smaller",
    "backward": "backpropagate: compute the gradient of the loss for every parameter",
    "clip_grad": "scale the gradients down if their global norm is above a limit",
    "step": "let the optimizer move every parameter against its gradient",
    "scheduler": "let the learning-rate scheduler change the learning rate",
    "validate": "measure loss and accuracy on held-out data (eval mode, no gradients)",
    "checkpoint": "keep a copy of the model if this is the best validation loss so far",
    "early_stop": "stop training when validation loss has not improved for a while",
}


@dataclass(frozen=True)
class ScenarioInfo:
    """A built-in experiment: where its factory lives and what it teaches."""

    name: str
    description: str
    task: str  # "binary" | "classification" | "regression"
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
            "binary",
            "loopscope.scenarios.blobs:experiment",
            frozenset({"binary_logits", "relu", "no_batchnorm", "mlp", "multi_feature_inputs", "labels", "validation", "float_inputs", "tensor_inputs", "hidden_layers", "map_dataset"}),
        ),
        ScenarioInfo(
            "spirals",
            "3 interleaved spirals in 2-D; an MLP with dropout, CrossEntropyLoss, Adam, with the "
            "careful loop: gradient clipping, LR scheduler, best checkpoint, early stopping",
            "classification",
            "loopscope.scenarios.spirals:experiment",
            frozenset({"classification", "relu", "no_batchnorm", "mlp", "multi_feature_inputs", "dropout", "train_eval_differs", "scheduler",
                       "clip_grad", "labels", "validation", "float_inputs", "tensor_inputs", "hidden_layers", "map_dataset"}),
        ),
        ScenarioInfo(
            "regression",
            "fit a noisy 1-D curve with an MLP and MSELoss, Adam",
            "regression",
            "loopscope.scenarios.regression:experiment",
            frozenset({"regression_column", "no_batchnorm", "mlp", "validation", "float_inputs", "tensor_inputs",
                       "hidden_layers", "map_dataset"}),
        ),
        ScenarioInfo(
            "digits",
            "8x8 images of the digits 0-9 drawn locally; a small CNN with batch norm, "
            "CrossEntropyLoss, SGD with momentum",
            "classification",
            "loopscope.scenarios.digits:experiment",
            frozenset({"classification", "relu", "batchnorm", "train_eval_differs", "multi_feature_inputs", "labels", "validation", "float_inputs", "tensor_inputs", "hidden_layers", "map_dataset"}),
        ),
    )
}
DEFAULT_SCENARIO = "blobs"
