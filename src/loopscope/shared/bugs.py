"""The bug catalog: classic training-loop mistakes, described for a student (torch-free).

The engine injects them (`loopscope.engine.inject`); the diagnostics name them as suspects.
Each bug lists the experiment features it needs (`requires`), so a scenario only offers the
bugs whose effect can be seen on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from loopscope.shared.vocab import Stage


@dataclass(frozen=True)
class Bug:
    """One mistake: where it is, the code change, what you will see, why, and the fix."""

    id: str
    title: str
    stage: Stage
    correct: str  # the line(s) a careful loop has
    buggy: str  # what the mistake puts there ("" when the line is simply missing)
    symptom: str
    why: str
    fix: str
    requires: tuple[str, ...] = ()
    script: bool = False  # a hook can apply it to a script as written (script mode, DESIGN.md §8)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["requires"] = list(self.requires)
        return data


BUGS: tuple[Bug, ...] = (
    Bug(
        "skip_zero_grad",
        "zero_grad() is never called",
        Stage.ZERO_GRAD,
        "optimizer.zero_grad()",
        "",
        "The gradient norm climbs step after step; the loss oscillates or diverges.",
        "PyTorch adds new gradients to the ones already stored in .grad. Without zero_grad() each "
        "step uses the sum of every gradient so far, so the steps keep getting bigger.",
        "Call optimizer.zero_grad() once per iteration, before loss.backward().",
        script=True,
    ),
    Bug(
        "zero_grad_after_backward",
        "zero_grad() between backward() and step()",
        Stage.STEP,
        "optimizer.step()",
        "optimizer.zero_grad()\noptimizer.step()",
        "The gradients are gone when step() runs; the parameters never move and the loss stays flat.",
        "zero_grad() throws away the gradients backward() just computed, so step() has nothing to follow.",
        "Clear gradients at the start of the iteration (or after step()), never between backward() and step().",
    ),
    Bug(
        "missing_backward",
        "loss.backward() is missing",
        Stage.BACKWARD,
        "loss.backward()",
        "",
        "Every gradient is None; the parameters never move and the loss stays flat.",
        "Gradients are only computed by backward(). Without it the optimizer has no gradient to use "
        "and skips every parameter.",
        "Call loss.backward() after computing the loss and before optimizer.step().",
    ),
    Bug(
        "missing_step",
        "optimizer.step() is missing",
        Stage.STEP,
        "optimizer.step()",
        "",
        "Gradients are computed every iteration but the parameters never change; the loss stays flat.",
        "backward() only computes gradients. The parameters change only when the optimizer's step() applies them.",
        "Call optimizer.step() after loss.backward().",
        script=True,
    ),
    Bug(
        "step_before_backward",
        "step() runs before backward()",
        Stage.STEP,
        "loss.backward()\noptimizer.step()",
        "optimizer.step()\noptimizer.zero_grad()\nloss.backward()",
        "The first step uses no gradient; from the second iteration on, backward() raises: a weight "
        "it needs was changed in place.",
        "The forward pass saved the weights it used for backward(). step() changes those weights in "
        "place first, so autograd refuses to compute gradients from stale values.",
        "Order the calls: zero_grad(), forward, loss, backward(), step().",
    ),
    Bug(
        "double_softmax",
        "softmax before CrossEntropyLoss",
        Stage.FORWARD,
        "out = model(x)",
        "out = model(x).softmax(dim=1)",
        "The loss input's rows sum to 1; gradients are tiny, learning is slow, and the loss cannot "
        "go below ln(1 + (C-1)/e) (1.46 for 10 classes).",
        "CrossEntropyLoss applies log-softmax itself and expects raw scores (logits). A softmax "
        "before it squashes the scores into [0, 1], which flattens the gradients.",
        "Feed the logits straight to CrossEntropyLoss; apply softmax only for reporting.",
        requires=("classification",),
        script=True,
    ),
    Bug(
        "sigmoid_before_bce_with_logits",
        "sigmoid before BCEWithLogitsLoss",
        Stage.FORWARD,
        "out = model(x)",
        "out = torch.sigmoid(model(x))",
        "The loss input stays inside [0, 1]; gradients are squashed and the loss stays high.",
        "BCEWithLogitsLoss applies the sigmoid itself. A second sigmoid means the model can never "
        "output a confident score: its largest 'logit' is 1.",
        "Pass the raw model output to BCEWithLogitsLoss (or use BCELoss with one sigmoid).",
        requires=("binary_logits",),
    ),
    Bug(
        "lr_too_high",
        "learning rate 100x too high",
        Stage.STEP,
        "optimizer = SGD(model.parameters(), lr=lr)",
        "optimizer = SGD(model.parameters(), lr=lr * 100)",
        "The update/weight ratio is far above 1e-3; the loss jumps around, explodes or becomes NaN.",
        "Each step moves the weights by a big fraction of their size, overshooting the minimum every time.",
        "Lower the learning rate until updates are about 1e-3 of the weights.",
        script=True,
    ),
    Bug(
        "lr_too_low",
        "learning rate 1000x too low",
        Stage.STEP,
        "optimizer = SGD(model.parameters(), lr=lr)",
        "optimizer = SGD(model.parameters(), lr=lr / 1000)",
        "The update/weight ratio is far below 1e-3; the loss barely moves.",
        "Each step moves the weights by a tiny fraction of their size, so training needs thousands "
        "of times more steps.",
        "Raise the learning rate until updates are about 1e-3 of the weights.",
        script=True,
    ),
    Bug(
        "validate_in_train_mode",
        "model.eval() forgotten before validation",
        Stage.VALIDATE,
        "model.eval()",
        "",
        "Dropout stays on (and batch norm uses batch statistics) during validation: val loss is "
        "noisier and worse than it should be.",
        "model.eval() switches dropout and batch norm to their inference behaviour. Without it, "
        "validation measures a randomly damaged model.",
        "Call model.eval() before validating and model.train() after.",
        requires=("validation", "train_eval_differs"),
        script=True,
    ),
    Bug(
        "train_in_eval_mode",
        "model.train() forgotten after validation",
        Stage.VALIDATE,
        "model.train()",
        "",
        "After the first validation, dropout is off and batch norm statistics are frozen during training.",
        "model.eval() stays in force until model.train() is called, so training continues in inference mode.",
        "Call model.train() after validating (or at the start of every epoch).",
        requires=("validation", "train_eval_differs"),
    ),
    Bug(
        "validate_with_grad",
        "validation without torch.no_grad()",
        Stage.VALIDATE,
        "with torch.no_grad():",
        "",
        "Validation builds an autograd graph for nothing: it uses more memory and time.",
        "Outside torch.no_grad(), every operation records how to compute gradients, even when no backward() follows.",
        "Wrap validation in `with torch.no_grad():` (or torch.inference_mode()).",
        requires=("validation",),
        script=True,
    ),
    Bug(
        "shuffled_labels",
        "labels do not match their inputs",
        Stage.LOAD_BATCH,
        "train_set = TensorDataset(inputs, labels)",
        "train_set = TensorDataset(inputs, scrambled(labels))",
        "Train loss creeps down slowly (the model memorises), while val accuracy stays at chance.",
        "If labels are not those of their inputs there is nothing to learn that generalises; the "
        "model can only memorise the training pairs.",
        "Check the data pipeline: show a few inputs with their labels and make sure they match.",
        requires=("labels", "validation"),
    ),
    Bug(
        "unnormalized_inputs",
        "inputs left in raw scale",
        Stage.LOAD_BATCH,
        "x = (x_raw - mean) / std",
        "x = x_raw  # about 100x larger, offset by 50",
        "Huge activations and gradients: training is unstable or very slow.",
        "Weights are initialised for inputs around mean 0, std 1. Inputs 100x larger make every "
        "layer's output 100x larger too.",
        "Standardise each feature with the training set's mean and std.",
        requires=("float_inputs",),
    ),
    Bug(
        "target_shape_broadcast",
        "MSE between [N, 1] outputs and [N] targets",
        Stage.LOSS,
        "loss = loss_fn(out, y)  # y: [N, 1]",
        "loss = loss_fn(out, y.squeeze(1))  # y: [N]",
        "The loss broadcasts to an [N, N] matrix; the model learns the mean of the targets only.",
        "Subtracting an [N] tensor from an [N, 1] one broadcasts to [N, N]: every output is "
        "compared with every target. PyTorch only warns.",
        "Make the shapes equal: y.view(-1, 1) or out.squeeze(1).",
        requires=("regression_column",),
    ),
    Bug(
        "loss_accumulates_graph",
        "running_loss += loss (no .item())",
        Stage.LOSS,
        "running_loss += loss.item()",
        "running_loss += loss",
        "Every iteration's autograd graph is kept alive: memory grows step after step.",
        "Adding the loss tensor (not its number) links every iteration's graph into one chain that can never be freed.",
        "Accumulate numbers: running_loss += loss.item().",
    ),
    Bug(
        "inputs_wrong_dtype",
        "inputs left as float64",
        Stage.LOAD_BATCH,
        "x, y = x.to(device), y.to(device)",
        "x, y = x.to(device).double(), y.to(device)",
        "The forward pass raises a dtype error at the first layer.",
        "NumPy arrays default to float64 while PyTorch weights are float32; matrix multiplication needs both to match.",
        "Convert inputs with x.float() (or build tensors with dtype=torch.float32).",
        requires=("float_inputs",),
    ),
    Bug(
        "forward_under_no_grad",
        "forward pass inside torch.no_grad()",
        Stage.FORWARD,
        "out = model(x)",
        "with torch.no_grad():\n    out = model(x)",
        "loss.backward() raises: the loss does not require grad.",
        "Under torch.no_grad() no autograd graph is recorded, so there is nothing to backpropagate through.",
        "Only use torch.no_grad() for evaluation, never around the training forward pass.",
    ),
    Bug(
        "dead_relu_init",
        "biases initialised very negative",
        Stage.FORWARD,
        "nn.init defaults",
        "layer.bias.data.fill_(-5.0)  # hidden layers",
        "Most ReLU units output 0 for every input; gradients vanish and learning stalls.",
        "A ReLU with a very negative input outputs 0 and passes back zero gradient: the unit is "
        "dead and cannot recover.",
        "Keep PyTorch's default initialisation (or small biases); check the fraction of zeros after each ReLU.",
        requires=("relu", "no_batchnorm"),  # batch norm re-centres, cancelling the bias
    ),
    Bug(
        "exploding_init",
        "weights initialised 10x too large",
        Stage.FORWARD,
        "nn.init defaults",
        "layer.weight.data *= 10",
        "Activations and gradients grow layer by layer; the loss is huge or NaN.",
        "Each layer multiplies its input by its weights; weights 10x too big make every layer's "
        "output 10x bigger than the last.",
        "Use PyTorch's default (Kaiming/Xavier-style) initialisation.",
        requires=("no_batchnorm",),
    ),
    Bug(
        "no_shuffle_sorted_data",
        "data sorted by label and never shuffled",
        Stage.LOAD_BATCH,
        "DataLoader(train_set, batch_size=B, shuffle=True)",
        "DataLoader(sorted_by_label(train_set), batch_size=B, shuffle=False)",
        "Each batch holds a single class; the loss saw-tooths within every epoch.",
        "The model is pushed towards one class, then the next: each batch undoes what the last taught.",
        "Shuffle the training data every epoch (shuffle=True).",
        requires=("labels", "map_dataset"),
    ),
    Bug(
        "zero_init",
        "all weights initialised to 0",
        Stage.FORWARD,
        "nn.init defaults",
        "nn.init.zeros_(layer.weight); nn.init.zeros_(layer.bias)",
        "Hidden units stay identical (here: all zero); only the output bias learns.",
        "With identical weights every hidden unit computes the same thing and gets the same "
        "gradient, so they never become different (and ReLU(0) passes no gradient at all).",
        "Initialise weights randomly (PyTorch's default does).",
        requires=("hidden_layers",),
    ),
    Bug(
        "missing_activation",
        "ReLU replaced by nothing",
        Stage.FORWARD,
        "nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c)",
        "nn.Linear(a, b), nn.Linear(b, c)",
        "A stack of linear layers is one linear layer: it cannot fit curved boundaries.",
        "Without a non-linearity between them, Linear(Linear(x)) is just another Linear(x).",
        "Put an activation (ReLU, GELU, Tanh) between layers.",
        requires=("relu", "mlp"),  # in a CNN, max-pooling still bends the function
    ),
    Bug(
        "dropout_too_high",
        "dropout p=0.8",
        Stage.FORWARD,
        "nn.Dropout(p=0.1)",
        "nn.Dropout(p=0.8)",
        "Train loss is high and noisy; val loss is better than train loss.",
        "Dropout zeroes a fraction p of the units in training: at p=0.8 the network only ever sees a fifth of itself.",
        "Use modest dropout (0.1-0.5) and watch train vs val loss.",
        requires=("dropout",),
    ),
    Bug(
        "val_is_train",
        "validation on the training data",
        Stage.VALIDATE,
        "for x, y in val_loader:",
        "for x, y in train_loader:",
        "Val loss tracks train loss exactly and looks too good.",
        "Data the model was trained on says nothing about data it has never seen.",
        "Hold out a validation set that the model never trains on.",
        requires=("validation",),
    ),
    Bug(
        "clip_loss_not_grad",
        "loss clamped instead of gradients clipped",
        Stage.CLIP_GRAD,
        "clip_grad_norm_(model.parameters(), max_norm)",
        "loss = loss.clamp(max=max_norm)",
        "The loss is flat-topped at the limit and the gradient is exactly zero on hard batches.",
        "clamp() passes no gradient where it cuts: the batches with the largest loss, the ones "
        "with the most to teach, teach nothing.",
        "Clip gradients after backward(): torch.nn.utils.clip_grad_norm_(params, max_norm).",
        requires=("clip_grad",),
    ),
    Bug(
        "scheduler_before_step",
        "scheduler.step() before optimizer.step()",
        Stage.SCHEDULER,
        "optimizer.step()\nscheduler.step()",
        "scheduler.step()\noptimizer.step()",
        "The learning-rate schedule is one step early (PyTorch warns about the order).",
        "The scheduler counts its own calls; calling it first skips the first value of the schedule.",
        "Call scheduler.step() after optimizer.step().",
        requires=("scheduler",),
    ),
    Bug(
        "accumulation_not_divided",
        "accumulated loss not divided by the number of micro-batches",
        Stage.LOSS,
        "loss = loss / K",
        "",
        "Training behaves as if the learning rate were K times higher: bigger steps, a noisier or diverging loss.",
        "backward() adds each micro-batch's gradients to .grad. Divided by K they sum to the gradient of "
        "the mean over all K micro-batches; undivided, the step follows their sum, K times as long.",
        "Divide each micro-batch's loss by K (the number of micro-batches per step) before backward().",
        requires=("accumulation",),
    ),
    Bug(
        "clip_before_unscale",
        "gradients clipped before scaler.unscale_()",
        Stage.CLIP_GRAD,
        "scaler.unscale_(optimizer)\nclip_grad_norm_(model.parameters(), max_norm)",
        "clip_grad_norm_(model.parameters(), max_norm)\nscaler.unscale_(optimizer)",
        "Every clip fires and the gradients come out thousands of times smaller than the limit: SGD barely "
        "moves; Adam, which divides by the gradients' own size, hides it until they sink to its eps.",
        "Until unscale_() the gradients are multiplied by the loss scale (65536 at first), so the clip "
        "measures a norm thousands of times too big and shrinks the gradients to fit; unscale_() then "
        "divides them by the scale again.",
        "Call scaler.unscale_(optimizer) before clip_grad_norm_, then scaler.step(optimizer).",
        requires=("fp16_scaler", "clip_grad"),
    ),
    Bug(
        "view_instead_of_permute",
        "x.view(...) where x.permute(...) was meant",
        Stage.LOAD_BATCH,
        "x = x_features_first.permute(1, 0)",
        "x = x_features_first.view(N, F)",
        "Shapes look right, but each input row mixes values from several examples.",
        "view() reinterprets memory in order; it does not move dimensions. Only permute() (or transpose) swaps axes.",
        "Use permute()/transpose() to reorder dimensions; use view()/reshape() only to regroup them.",
        requires=("tensor_inputs", "multi_feature_inputs"),  # one feature per row: nothing to mix
    ),
    # ----- many processes (--nproc): the model is a DistributedDataParallel ------------------
    Bug(
        "no_distributed_sampler",
        "the DataLoader has no DistributedSampler",
        Stage.LOAD_BATCH,
        "sampler = DistributedSampler(train_set)\ntrain_loader = DataLoader(train_set, batch_size=B, sampler=sampler)",
        "train_loader = DataLoader(train_set, batch_size=B, shuffle=True)",
        "Every rank loads the very same batches: N processes do the work of one, and an epoch is N times too long.",
        "A DataLoader knows nothing of the other ranks; seeded alike, each shuffles the whole dataset in the "
        "same order. DDP then averages N copies of one gradient.",
        "Give the training DataLoader a DistributedSampler(dataset): each rank reads its own 1/N of the data.",
        requires=("distributed",),
    ),
    Bug(
        "set_epoch_forgotten",
        "sampler.set_epoch(epoch) is never called",
        Stage.LOAD_BATCH,
        "sampler.set_epoch(epoch)  # a new shuffle each epoch",
        "",
        "Every epoch visits the examples in exactly the same order on every rank.",
        "A DistributedSampler shuffles with seed + epoch; without set_epoch the epoch stays 0, so the "
        "shuffle of the first epoch is repeated forever.",
        "Call sampler.set_epoch(epoch) at the start of each epoch, before iterating the loader.",
        requires=("distributed",),
    ),
    Bug(
        "batchnorm_not_synced",
        "BatchNorm not converted to SyncBatchNorm",
        Stage.FORWARD,
        "model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics over every rank's batch",
        "",
        "Each rank normalizes with the mean and variance of its own share of the batch: noisier "
        "statistics than the global batch's, and running averages that differ from rank to rank.",
        "BatchNorm computes its statistics from the batch it is given, and under DDP that is one "
        "rank's share; DDP averages the gradients, not the statistics, and overwrites the other ranks' "
        "running averages with rank 0's at each forward.",
        "Convert the model before wrapping it: model = DDP(nn.SyncBatchNorm.convert_sync_batchnorm(model)); "
        "its BatchNorm layers then all-reduce their statistics over the ranks.",
        requires=("distributed", "batchnorm"),
    ),
    Bug(
        "loss_divided_by_world_size",
        "the loss divided by the world size under DDP",
        Stage.LOSS,
        "loss = loss_fn(out, y)  # DDP averages the ranks' gradients itself",
        "loss = loss_fn(out, y) / dist.get_world_size()",
        "Training crawls: every step is 1/N of what it should be, as if the learning rate were divided "
        "by the number of ranks.",
        "DDP's all-reduce already averages the gradients over the N ranks (it sums them and divides by "
        "N). Dividing each rank's loss by N as well divides the averaged gradient a second time.",
        "Leave the loss as the loss function returns it: DDP's averaging is the division by N.",
        requires=("distributed",),
    ),
    Bug(
        "accumulation_without_no_sync",
        "gradient accumulation without model.no_sync()",
        Stage.BACKWARD,
        "with nullcontext() if sync else model.no_sync():  # one all-reduce a step",
        "with nullcontext():  # every micro-batch's backward all-reduces",
        "The numbers stay right, but every micro-batch's backward waits for an all-reduce: K times the "
        "communication of one step.",
        "DDP all-reduces the gradients at every backward() unless told not to; summed locally over the "
        "micro-batches and all-reduced once, they come out the same.",
        "Run the forward and backward of every micro-batch but the last in `with model.no_sync():`.",
        requires=("distributed", "accumulation"),
    ),
    Bug(
        "val_metrics_rank0_only",
        "validation metrics from rank 0's shard only",
        Stage.VALIDATE,
        "totals = torch.tensor([val_loss_sum, correct, count])\ndist.all_reduce(totals)  # every rank's share, summed",
        "totals = torch.tensor([val_loss_sum, correct, count])  # this rank's share only",
        "The validation loss and accuracy rank 0 prints are those of its share of the validation set; "
        "the other ranks print other numbers.",
        "With a DistributedSampler on the validation loader each rank sees 1/N of the set; its sums "
        "describe that share alone until they are all-reduced.",
        "all_reduce the sums (loss, correct, count) over the ranks before dividing, then report them on rank 0.",
        requires=("distributed", "validation"),
    ),
    Bug(
        "checkpoint_every_rank",
        "every rank saves the checkpoint",
        Stage.CHECKPOINT,
        "if rank == 0: save(model)",
        "save(model)  # on every rank",
        "Each time the model improves, N processes write the same file at once.",
        "DDP keeps one model on every rank, so one copy is all there is to save; N writers of one path "
        "race (a reader can find it half-written) and spend N times the disk time.",
        "Save on rank 0 only (`if dist.get_rank() == 0:`), and barrier before other ranks read it.",
        requires=("distributed", "checkpoint"),
    ),
    Bug(
        "rank_modifies_parameters",
        "one rank changes its parameters outside DDP",
        Stage.STEP,
        "optimizer.step()",
        "optimizer.step()\nif rank == 1:\n    model.module.weight.data *= 1.001",
        "The ranks' parameters drift apart: each rank now trains a slightly different model.",
        "DDP keeps ranks identical only through the gradients it averages; a change made on one rank "
        "outside backward() and step() (an in-place edit, a rank-local schedule) is never shared.",
        "Change parameters only through the optimizer, identically on every rank (or broadcast from rank 0).",
        requires=("distributed",),
    ),
)

BUGS_BY_ID: dict[str, Bug] = {bug.id: bug for bug in BUGS}
# Bugs that move a call rather than change a line: the code panel shows them by the stage order.
ORDER_BUGS = frozenset({"step_before_backward", "scheduler_before_step", "clip_before_unscale"})


def applicable(features: frozenset[str] | set[str]) -> list[str]:
    """Ids of the bugs whose requirements an experiment with these features meets."""
    return [bug.id for bug in BUGS if set(bug.requires) <= set(features)]


# Plain words for the features in `Bug.requires`, for error messages and listings.
FEATURE_WORDS: dict[str, str] = {
    "classification": "CrossEntropyLoss",
    "binary_logits": "BCEWithLogitsLoss",
    "labels": "class labels",
    "validation": "a validation loader",
    "checkpoint": "a checkpoint stage (checkpoint=True or a path)",
    "train_eval_differs": "dropout or batch norm",
    "dropout": "dropout",
    "relu": "ReLU layers",
    "no_batchnorm": "no batch norm",
    "batchnorm": "batch norm",
    "mlp": "no convolutions",
    "hidden_layers": "two or more layers",
    "scheduler": "an LR scheduler",
    "clip_grad": "gradient clipping",
    "accumulation": "gradient accumulation (accumulation > 1)",
    "fp16_scaler": "amp='fp16' (a GradScaler)",
    "map_dataset": "a DataLoader over a map-style dataset",
    "float_inputs": "floating-point inputs",
    "tensor_inputs": "a single input tensor",
    "multi_feature_inputs": "more than one value per example",
    "regression_column": "an MSE-style loss with [N, 1] targets",
    "distributed": "several processes (`--nproc 2` or more, on run or trace)",
}


def requirement_text(bug: Bug) -> str:
    return ", ".join(FEATURE_WORDS.get(f, f) for f in bug.requires) or "nothing special"


def unknown_bug_message(bug_id: str) -> str:
    import difflib

    close = difflib.get_close_matches(bug_id, BUGS_BY_ID, n=1)
    hint = f"; did you mean {close[0]}?" if close else "; `loopscope bugs` lists them"
    return f"unknown bug {bug_id!r}{hint}"
