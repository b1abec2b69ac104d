"""Expert Gate (Aljundi, Chakravarty, Tuytelaars, "Expert Gate: Lifelong Learning with a Network of Experts", CVPR
2017, arXiv 1611.06194) with LoRA experts: one LoRA expert and one undercomplete autoencoder per task; a sequence
goes to the expert whose autoencoder reconstructs its prompt's features best, and a new task (expert +
autoencoder) can be added without touching the old ones.

Per sequence b, with z_b the frozen prompt features (the mean over b's prompt tokens of the frozen base model's
hidden state after decoder layer `feature_layer`, adapters off: `prompt_routing.prompt_features`), and per task k
the autoencoder A_k (W_e [h, d], b_e [h], W_d [d, h], b_d [d], h = `autoencoder_dim`):

    x_b    = sigmoid((z_b - mu) / sqrt(var + 1e-5))              preprocessing: standardise, then squash into (0, 1)
    A_k(x) = sigmoid(W_d,k relu(W_e,k x + b_e,k) + b_d,k)         one hidden layer, undercomplete (h < d)
    er_k   = sum_i (x_b,i - A_k(x_b)_i)^2                         reconstruction error (`reconstruction_error`="sum";
                                                                  "mean": divided by d)
    p_k    = exp(-er_k / t) / sum_j exp(-er_j / t)                relevance, t = `temperature`
    e_b    = argmax_k p_k = argmin_k er_k                         hard gate: top-1, one expert per sequence

and every targeted Linear W (one LoRA expert (A_k, B_k) of rank r per task) computes

    y[b, s] = W x[b, s] + bias + (lora_alpha / r) * B_{e_b} A_{e_b} dropout(x[b, s])

Training forwards with task ids (`task_ids`, a recipe's task column) apply each sample's own task expert, e_b =
task_ids[b], and train each sample's own autoencoder on its features:

    L = L_LM + autoencoder_loss_coef * mean_b l(x_b, A_{task_ids[b]}(x_b))
    l = mean_i [x_i log(x_i / a_i) + (1 - x_i) log((1 - x_i) / (1 - a_i))]     ("cross_entropy": the binary
        cross-entropy minus the target's entropy, so 0 at a perfect reconstruction; the same gradient)
    l = mean_i (x_i - a_i)^2                                                     ("squared_error")

The other autoencoders and experts get a zero gradient. Evaluation and inference forwards (and training forwards
without task ids) apply the gate's choice e_b; the gate reads frozen features only, so it does not depend on the
adapters and is decided on the prompt once (`PromptRouting.decide`), then kept for every generated token
(`PeftModel.generate`, with or without a cache; a cache returned by the prompt's forward). mu and var (shared by
every autoencoder, so that their errors stay comparable) are the mean and variance of the features of the first
`statistics_samples` training prompts (of every data-parallel rank, merged in rank order, so that the ranks keep
the same statistics), accumulated by the training forwards (or up front by
`calibrate_feature_statistics`), then frozen; they are saved with the adapter. The autoencoders are model-level:
one stack per adapter on the tuner (`ExpertGateModel`, parameters `expert_gate_encoder_weight` [K, h, d] ...),
saved once in adapter_model.safetensors (peft 0.21 saves the tuner's own adapter containers as it does VeRA's
shared matrices), which is why `inject_adapter_in_model` / transformers' `load_adapter` cannot take this method
(`uses_shared_state`): use `PeftModel.from_pretrained`.

Lifelong learning (the paper's Algorithm 1): `add_task` appends a task (a fresh expert in every layer and a fresh
autoencoder; the old ones bit for bit unchanged, the statistics frozen); train the new autoencoder on the new task's
data, then `task_relatedness` gives Rel(T_k, T_a) = 1 - (Er_a - Er_k) / Er_k for every old task a (Er: mean
reconstruction error on the new task's data of a's and of the new task's autoencoder), and `copy_expert` starts the
new expert from the most related one before it is fine-tuned on the new task's data. Training only on the new task's
samples with weight decay 0 leaves the old experts and autoencoders unchanged (their gradients are zero).

Checked against the paper (arXiv 1611.06194v2, Sections 3.1-3.3 and 4; and the authors' MATLAB code,
github.com/rahafaljundi/Expert-Gate at b01edb9: cnn_autoencoder_layer_relusig.m, test_*_gate.m,
compute_relatedness.m): the undercomplete one-hidden-layer autoencoder, encoder fully connected + ReLU, decoder fully
connected + sigmoid; the preprocessing, standardisation with statistics shared by all autoencoders (the paper uses
ImageNet's, "Different standardization regimes lead to non-comparable reconstruction errors") followed by a sigmoid;
training with cross-entropy, routing with the Euclidean reconstruction error; eq. 1 relevance softmax(-er / t) with
t = 2 (code: T=2); the hard gate (the most confident autoencoder's expert); eq. 2 relatedness 1 - (Er_a - Er_k) /
Er_k on the new task's validation data (code: 100 - 100 (Er_a - Er_k) / Er_k) and its use to pick the prior expert
(plus a 0.85 threshold between LwF and fine-tuning, which has no LoRA counterpart here); the hidden size 100 (the best
of 10, 50, 100, 200, 500 on AlexNet conv5 features; the code's default is 500).
Our reading, not the paper's: the features (frozen LLM hidden states pooled over the prompt, at the middle decoder
layer by default, for the paper's last conv layer of a pretrained AlexNet), statistics from the first training
prompts of all tasks (for ImageNet's: an LLM's pretraining statistics are not at hand), the error's reduction (the
sum of squares; MatConvNet's euclideanloss layer is not in the repository), the loss as a mean over dimensions
minus the target entropy, nn.Linear's initialisation (the code's sparse init, 15 N(0, 1) weights per unit, is not
followed), training the autoencoders jointly with the LoRA experts by the Trainer's optimizer (the authors' code:
apart, adagrad, lr 1e-2, weight decay 5e-4, 100 epochs), the LoRA experts themselves, and the features, errors and
decisions being per sequence. The paper's soft option (every expert whose relevance is above a threshold, 0.1,
analyses the sample separately) defines no way to mix the experts' outputs, so it is not implemented.
"""

import math
from dataclasses import dataclass, field

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn
from torch.nn import functional as F

from .config import LoraExpertConfig, TaskFields, _help, _number, _positive_int, _require
from .functional import sequence_lora
from .layer import (
    LinearWithExperts,
    LoraExpertLayer,
    RoutingRecord,
    _batch_size,
    checked_task_ids,
    outside_activation_checkpointing,
)
from .losses import AuxLossContext
from .model import ATTENTION, FFN, SUPPORTED_MODEL_TYPES, LoraExpertTuner, require_tasks
from .peft_types import add_peft_type
from .prompt_routing import (
    PromptRouting,
    SequenceRoutedLayer,
    prompt_features,
    prompt_mask,
)

EXPERT_GATE = add_peft_type("EXPERT_GATE")
RECONSTRUCTION_ERRORS = ("sum", "mean")  # er_k: the sum over the feature dimensions of the squared error, or the mean
AUTOENCODER_LOSSES = ("cross_entropy", "squared_error")
TARGET_MODULES = {model_type: ATTENTION + FFN for model_type in SUPPORTED_MODEL_TYPES}  # default: every projection
DECISION = "expert_gate"  # PromptRouting's key of an adapter's decision: (DECISION, adapter_name)
STANDARDIZATION_EPS = 1e-5
# the tuner's containers: the autoencoders (trained, the "router" group of a recipe's parameter_groups) and the
# standardisation statistics (buffers)
AUTOENCODER_PARAMETERS = ("expert_gate_encoder_weight", "expert_gate_encoder_bias", "expert_gate_decoder_weight",
                          "expert_gate_decoder_bias")
STATISTICS_BUFFERS = ("expert_gate_feature_mean", "expert_gate_feature_var", "expert_gate_feature_count")


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ExpertGateConfig(LoraExpertConfig, TaskFields):
    """Expert Gate: every targeted Linear gets one LoRA expert of rank r per task, and the model one undercomplete
    autoencoder per task on frozen prompt features; each sequence uses the expert of the autoencoder that
    reconstructs its prompt best (see the module's docstring for the formulas and what is the paper's).

    Training forwards with `task_ids` ([batch_size] ints below num_tasks; a recipe's `data.task_field`) use each
    sample's task expert and train its task autoencoder; evaluation and inference need no task id. The task names
    (`task_names[i]` has id i, expert i and autoencoder i) are saved with the adapter.
    Defaults: the paper's hidden size 100 and temperature 2, its cross-entropy training loss; r 8, alpha 16, dropout
    0.05 on every attention and FFN projection, features after the middle decoder layer (ours).
    """

    r: int = field(default=8, metadata=_help("Rank of each task's LoRA expert."))
    feature_layer: int | None = field(
        default=None, metadata=_help("The decoder layer l whose frozen hidden state, averaged over the prompt, the "
                                     "autoencoders read (0 = the input embeddings, l = after decoder layer l); "
                                     "None = num_hidden_layers // 2, written here when the adapter is built."))
    autoencoder_dim: int = field(
        default=100, metadata=_help("Hidden (code) size of each task's autoencoder; below the model's hidden size "
                                    "(undercomplete). The paper's best: 100."))
    temperature: float = field(
        default=2.0, metadata=_help("t of the relevance p_k = softmax(-er_k / t) over the autoencoders (the paper: "
                                    "2). The hard gate, argmin er_k, does not depend on it."))
    reconstruction_error: str = field(
        default="sum", metadata=_help(f"er_k, one of {list(RECONSTRUCTION_ERRORS)}: the sum or the mean over the "
                                      "feature dimensions of the squared difference between the preprocessed "
                                      "features and their reconstruction."))
    autoencoder_loss: str = field(
        default="cross_entropy", metadata=_help(f"Training loss of the autoencoders, one of "
                                                f"{list(AUTOENCODER_LOSSES)}: binary cross-entropy (the paper; minus "
                                                "the target's entropy) or squared error, mean over dimensions."))
    autoencoder_loss_coef: float = field(
        default=1.0, metadata=_help("Weight in the loss of the autoencoders' loss (each sample's own task "
                                    "autoencoder, forwards with task ids); 0 = the autoencoders do not train."))
    statistics_samples: int = field(
        default=1024, metadata=_help("The standardisation statistics are the features' mean and variance over the "
                                     "first this many training prompts (then frozen); 0 = no standardisation."))

    routes_per_sequence = True  # decided on the prompt, kept while generating (prompt_routing.py)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = EXPERT_GATE
        self._check_task_fields()
        _require(self.feature_layer is None or (isinstance(self.feature_layer, int)
                                                and not isinstance(self.feature_layer, bool)
                                                and self.feature_layer >= 0),
                 "feature_layer", self.feature_layer,
                 "must be None (the middle decoder layer) or an int >= 0 (0 = the input embeddings)")
        _require(_positive_int(self.autoencoder_dim), "autoencoder_dim", self.autoencoder_dim,
                 "must be a positive integer, below the model's hidden size")
        _require(_number(self.temperature) and self.temperature > 0, "temperature", self.temperature, "must be > 0")
        _require(self.reconstruction_error in RECONSTRUCTION_ERRORS, "reconstruction_error",
                 self.reconstruction_error, f"allowed values: {list(RECONSTRUCTION_ERRORS)}")
        _require(self.autoencoder_loss in AUTOENCODER_LOSSES, "autoencoder_loss", self.autoencoder_loss,
                 f"allowed values: {list(AUTOENCODER_LOSSES)}")
        _require(_number(self.autoencoder_loss_coef) and self.autoencoder_loss_coef >= 0, "autoencoder_loss_coef",
                 self.autoencoder_loss_coef, "must be >= 0")
        _require(isinstance(self.statistics_samples, int) and not isinstance(self.statistics_samples, bool)
                 and self.statistics_samples >= 0, "statistics_samples", self.statistics_samples,
                 "must be an int >= 0")


# ----------------------------------------------------------------------------------------------------------------
# The gate, as formulas


def preprocess(features: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """x = sigmoid((z - mu) / sqrt(var + eps)): features [B, d] standardised, then squashed into (0, 1)."""
    return torch.sigmoid((features - mean) / torch.sqrt(var + STANDARDIZATION_EPS))


def autoencoder_logits(inputs: torch.Tensor, encoder_weight: torch.Tensor, encoder_bias: torch.Tensor,
                       decoder_weight: torch.Tensor, decoder_bias: torch.Tensor) -> torch.Tensor:
    """Every autoencoder on every input before the output sigmoid: u[b, k] = W_d,k relu(W_e,k x_b + b_e,k) + b_d,k,
    [B, K, d] for inputs [B, d], W_e [K, h, d], b_e [K, h], W_d [K, d, h], b_d [K, d]; A_k(x_b) = sigmoid(u[b, k])."""
    code = F.relu(torch.einsum("bd,khd->bkh", inputs, encoder_weight) + encoder_bias)  # [B, K, h]
    return torch.einsum("bkh,kdh->bkd", code, decoder_weight) + decoder_bias


def reconstruction_errors(inputs: torch.Tensor, logits: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """er[b, k] = sum (or mean) over i of (x_b,i - A_k(x_b)_i)^2: [B, K]."""
    squared = (torch.sigmoid(logits) - inputs[:, None]).square()
    return squared.sum(dim=-1) if reduction == "sum" else squared.mean(dim=-1)


def relevance(errors: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_k = exp(-er_k / t) / sum_j exp(-er_j / t) (the paper's eq. 1), over the last dimension."""
    return torch.softmax(-errors / temperature, dim=-1)


def autoencoder_loss(inputs: torch.Tensor, logits: torch.Tensor, kind: str = "cross_entropy") -> torch.Tensor:
    """Training loss of one autoencoder per sample, [B], for inputs [B, d] and its logits [B, d]: mean over d of the
    binary cross-entropy minus the target's entropy (the KL divergence of Bernoulli(a) from Bernoulli(x), 0 at a
    perfect reconstruction), or of the squared error."""
    if kind == "squared_error":
        return (torch.sigmoid(logits) - inputs).square().mean(dim=-1)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, inputs, reduction="none")
    entropy = -(torch.special.xlogy(inputs, inputs) + torch.special.xlogy(1 - inputs, 1 - inputs))
    return (cross_entropy - entropy).mean(dim=-1)


def relatedness(new_task_error: float, old_task_error: float) -> float:
    """Rel(T_k, T_a) = 1 - (Er_a - Er_k) / Er_k (the paper's eq. 2): Er_k the mean reconstruction error of the new
    task's autoencoder on the new task's data, Er_a that of task a's autoencoder on the same data."""
    return 1.0 - (old_task_error - new_task_error) / new_task_error


@dataclass
class GateDecision:
    """The gate on B sequences: `inputs` [B, d] (preprocessed features), `errors` [B, K] and `relevance` [B, K]
    (detached, fp32), `expert` [B] = argmin of the errors, `loss` [B] (each sample's own task autoencoder's training
    loss, with gradients) when task ids were given and the loss is on, else None."""

    inputs: torch.Tensor
    errors: torch.Tensor
    relevance: torch.Tensor
    expert: torch.Tensor
    loss: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Routing records


@dataclass
class ExpertGateRecord(RoutingRecord):
    """The gate's decision of one forward (recorded once, by the first Expert Gate layer that runs): `logits` =
    -errors [B, K], `top_k_index` [B, 1] the applied experts."""

    errors: torch.Tensor | None = None  # [B, K] reconstruction errors
    relevance: torch.Tensor | None = None  # [B, K] softmax(-errors / temperature)
    gate_choice: torch.Tensor | None = None  # [B] argmin of the errors (= top_k_index without task ids at training)
    targets: torch.Tensor | None = None  # [B] the samples' task ids; None without them
    autoencoder_loss: torch.Tensor | None = None  # [B] with gradients; None without task ids or with the loss off


# ----------------------------------------------------------------------------------------------------------------
# Layer


class ExpertGateLinear(LinearWithExperts, SequenceRoutedLayer):
    """A frozen Linear plus one LoRA expert of rank r per task, of which each sequence uses one:

        y[b, s] = W x[b, s] + bias + (alpha / r) * B_{e_b} A_{e_b} dropout(x[b, s])

    with e_b the sample's task id (training forwards with task ids) or the model's autoencoder gate's choice on the
    prompt, taken once per prompt for the whole model (`ExpertGateModel.autoencoder_gate`). A [N, r, in],
    B [N, out, r]. `task_ids` [B] is set by the tuner's task-id hook, `prompt_routing` (with the frozen features) by
    its prompt-routing hook, before every forward of the model."""

    adapter_layer_names = ("expert_gate_A", "expert_gate_B")
    other_param_names = (*LoraExpertLayer.other_param_names, "gate", "feature_layer")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: ExpertGateConfig,
                 layer_index: int | None = None, gate: "ExpertGateModel | None" = None):
        super().__init__()
        self._init_linear(base_layer, layer_index)
        self.prompt_routing: PromptRouting | None = None
        self.gate: dict[str, ExpertGateModel] = {}  # adapter -> the tuner holding its autoencoders (not a submodule)
        self.feature_layer: dict[str, int] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, gate=gate)

    def update_layer(self, adapter_name: str, config: ExpertGateConfig, gate=None, **_) -> None:
        base, experts = self.get_base_layer(), config.num_tasks
        self.gate[adapter_name] = gate
        self.feature_layer[adapter_name] = config.feature_layer
        shapes = {"expert_gate_A": (experts, config.r, base.in_features),
                  "expert_gate_B": (experts, base.out_features, config.r)}
        self._add_adapter(adapter_name, config, shapes, num_experts=experts, top_k=1)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """This adapter's experts without the method prefix: `A`, `B`."""
        return {name.removeprefix(ExpertGateModel.prefix): getattr(self, name)[adapter_name]
                for name in self.adapter_layer_names if adapter_name in getattr(self, name)}

    def prompt_feature_layers(self) -> set[int]:
        return {self.feature_layer[name] for name in self._adapters_to_run()}

    def _experts(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        weights = self.adapter_tensors(adapter_name)
        batch = _batch_size(x)
        tokens = x.reshape(batch, -1, x.shape[-1]).to(weights["A"].dtype)  # [B, S, in]
        experts = self.choose_experts(tokens.shape[0], adapter_name)  # [B]
        delta = sequence_lora(self.lora_dropout[adapter_name](tokens), weights["A"], weights["B"], experts,
                              self.scaling[adapter_name])  # [B, S, out]
        return delta.view(*x.shape[:-1], -1)

    def choose_experts(self, batch: int, adapter_name: str) -> torch.Tensor:
        """The expert of every sequence, [B] long: the one decided on this forward's prompt (or kept from the
        prompt's forward that this one continues), decided by the first layer that asks."""
        routing = self.prompt_routing
        if routing is None:
            raise ValueError("Expert Gate decides each sequence's expert from frozen prompt features that the adapted "
                             "model's prompt-routing hook computes: call the model, not the layer alone.")
        key = (DECISION, adapter_name)
        if key not in routing.choices and routing.continuing:
            raise ValueError("Expert Gate decides each sequence's expert on its prompt, but this forward continues a "
                             "cache that no prompt forward of this model returned: decode with `generate`, or pass "
                             "the cache returned by the prompt's forward.")
        with outside_activation_checkpointing():  # a recomputation reuses the decision: it runs no autoencoder
            experts = routing.decide(key, lambda: self._decide(routing, batch, adapter_name))
        if experts.shape[0] != batch:
            raise ValueError(f"Expert Gate chose experts for {experts.shape[0]} sequences on the prompt, but this "
                             f"forward has {batch}.")
        return experts

    def _decide(self, routing: PromptRouting, batch: int, adapter_name: str) -> torch.Tensor:
        gate, layer = self.gate[adapter_name], self.feature_layer[adapter_name]
        if layer not in routing.features:
            raise RuntimeError(f"Expert Gate needs the frozen prompt features of layer {layer}, which this forward's "
                               f"prompt-routing hook did not compute.")
        device = self.expert_gate_A[adapter_name].device
        task_ids = None if self.task_ids is None else checked_task_ids(
            self.task_ids, batch, self.num_experts[adapter_name], "Expert Gate", device)
        decision = gate.autoencoder_gate(routing.features[layer], adapter_name, task_ids=task_ids,
                                         update_statistics=self.training)
        experts = task_ids if self.training and task_ids is not None else decision.expert.to(device)
        if self._records is not None:
            self._records.append(ExpertGateRecord(
                adapter_name, self.layer_index, -decision.errors, experts[:, None], batch, errors=decision.errors,
                relevance=decision.relevance, gate_choice=decision.expert, targets=task_ids,
                autoencoder_loss=decision.loss))
        return experts


# ----------------------------------------------------------------------------------------------------------------
# Tuner


def autoencoder_terms(config: ExpertGateConfig, records) -> dict:
    """{"autoencoder_loss": (coef, mean over the recorded samples with task ids of their own autoencoder's loss),
    "gate_accuracy": (0, fraction of them whose gate choice is their task)}: logged, the loss weighted into the
    loss; {} when no record has task ids."""
    records = [record for record in records if isinstance(record, ExpertGateRecord) and record.targets is not None]
    if not records:
        return {}
    targets = torch.cat([record.targets for record in records])
    choices = torch.cat([record.gate_choice.to(targets.device) for record in records])
    terms = {}
    losses = [record.autoencoder_loss for record in records if record.autoencoder_loss is not None]
    if config.autoencoder_loss_coef != 0 and losses:
        terms["autoencoder_loss"] = (config.autoencoder_loss_coef, torch.cat(losses).mean())
    terms["gate_accuracy"] = (0.0, (choices == targets).float().mean())
    return terms


class ExpertGateModel(LoraExpertTuner):
    """Expert Gate: Linears -> `ExpertGateLinear` (one LoRA expert per task, one expert per sequence); the tuner holds
    one autoencoder per task for each adapter (`expert_gate_encoder_weight` [K, h, d], `..._encoder_bias` [K, h],
    `..._decoder_weight` [K, d, h], `..._decoder_bias` [K, d]) and the features' standardisation statistics
    (`expert_gate_feature_mean`, `_var` [d], `_count` []), saved once with the adapter. The model takes `task_ids`
    ([batch_size] ints) in training forwards. Aux loss (forwards with task ids): `autoencoder_loss_coef` * the
    autoencoders' loss, `autoencoder_loss`; `gate_accuracy` is logged with weight 0."""

    prefix = "expert_gate_"
    tuner_layer_cls = ExpertGateLinear
    target_module_mapping = TARGET_MODULES
    uses_shared_state = True  # the autoencoders live on the tuner: `inject_adapter_in_model` cannot build them
    adapter_layer_names = AUTOENCODER_PARAMETERS  # read by trainer.parameter_groups, with `parameter_group`

    def parameter_group(self, layer_name: str) -> str:
        """The autoencoders are the gate: a recipe's `parameter_groups` group "router"."""
        return "router"

    # Building

    def _prepare_adapter_config(self, peft_config: ExpertGateConfig, model_config: dict) -> ExpertGateConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        require_tasks(peft_config, "Expert Gate")
        depth = self.num_decoder_layers
        if depth is None:
            raise ValueError("Expert Gate reads frozen prompt features after a decoder layer, but the base model's "
                             "config has no `num_hidden_layers`.")
        if peft_config.feature_layer is None:
            peft_config.feature_layer = depth // 2
        _require(peft_config.feature_layer <= depth, "feature_layer", peft_config.feature_layer,
                 f"must be in [0, {depth}] for this model (num_hidden_layers={depth})")
        hidden = model_config.get("hidden_size")
        _require(hidden is None or peft_config.autoencoder_dim < hidden, "autoencoder_dim",
                 peft_config.autoencoder_dim, f"must be below the model's hidden size {hidden} (undercomplete)")
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if adapter_name not in getattr(self, "expert_gate_encoder_weight", {}):
            self._add_autoencoders(adapter_name, peft_config)
        super()._create_and_replace(peft_config, adapter_name, target, target_name, parent, current_key, **kwargs)

    def _add_autoencoders(self, adapter_name: str, config: ExpertGateConfig) -> None:
        """The adapter's K autoencoders (nn.Linear's initialisation) and identity statistics, fp32, on the device of
        the model's weights."""
        if not hasattr(self, "expert_gate_encoder_weight"):
            for name in AUTOENCODER_PARAMETERS:
                setattr(self, name, nn.ParameterDict())
            for name in STATISTICS_BUFFERS:
                setattr(self, name, BufferDict({}, persistent=True))
        hidden = feature_size(self.model)
        device = next(self.model.parameters()).device
        parameters = new_autoencoders(config.num_tasks, hidden, config.autoencoder_dim, device)
        for name, value in zip(AUTOENCODER_PARAMETERS, parameters):
            getattr(self, name)[adapter_name] = nn.Parameter(value)
        self.expert_gate_feature_mean[adapter_name] = torch.zeros(hidden, device=device)
        self.expert_gate_feature_var[adapter_name] = torch.ones(hidden, device=device)
        self.expert_gate_feature_count[adapter_name] = torch.zeros((), device=device)

    def _layer_options(self, config, key, layer_index) -> dict:
        return {"gate": self}

    def _new_layer(self, config, adapter_name, target, key, layer_index, options) -> nn.Module:
        return ExpertGateLinear(target, adapter_name, config, layer_index=layer_index, **options)

    # Adapters: the tuner's own containers follow the layers'

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = {adapter_name} if isinstance(adapter_name, str) else set(adapter_name)
        for name in AUTOENCODER_PARAMETERS:
            for key, param in getattr(self, name, {}).items():
                param.requires_grad_(key in active and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for name in (*AUTOENCODER_PARAMETERS, *STATISTICS_BUFFERS):
            getattr(self, name).pop(adapter_name, None)

    # The gate

    def autoencoder_gate(self, features: torch.Tensor, adapter_name: str, task_ids: torch.Tensor | None = None,
                         update_statistics: bool = False) -> GateDecision:
        """The gate of the adapter on frozen prompt features [B, d]: preprocessing, every autoencoder's error and
        relevance, the argmin; with `task_ids` [B] (and the loss on) each sample's own task autoencoder's loss.
        `update_statistics` (training forwards) first adds the features to the statistics, while fewer than
        `statistics_samples` prompts are in them."""
        config = self.peft_config[adapter_name]
        weights = [getattr(self, name)[adapter_name] for name in AUTOENCODER_PARAMETERS]
        features = features.to(weights[0].device, torch.float32)
        if update_statistics:
            self._update_statistics(adapter_name, features, config.statistics_samples)
        inputs = preprocess(features, self.expert_gate_feature_mean[adapter_name],
                            self.expert_gate_feature_var[adapter_name]).to(weights[0].dtype)
        logits = autoencoder_logits(inputs, *weights)  # [B, K, d]
        errors = reconstruction_errors(inputs.detach(), logits.detach(), config.reconstruction_error).float()
        loss = None
        if task_ids is not None and config.autoencoder_loss_coef != 0:
            own = logits[torch.arange(inputs.shape[0], device=logits.device), task_ids.to(logits.device)]  # [B, d]
            loss = autoencoder_loss(inputs, own, config.autoencoder_loss).float()
        return GateDecision(inputs.detach(), errors, relevance(errors, config.temperature), errors.argmin(dim=-1), loss)

    @torch.no_grad()
    def _update_statistics(self, adapter_name: str, features: torch.Tensor, limit: int) -> None:
        """Merge the first rows of features [B, d] (up to `limit` prompts in all) into the running mean and variance
        (population variance; Chan et al.'s pairwise update, in float64). Under data parallelism (torch.distributed
        initialised) every rank must call it at the same time: the ranks' rows are taken in rank order, as one
        process would take the concatenated batch, and every rank keeps the same statistics."""
        count = self.expert_gate_feature_count[adapter_name]
        room = max(0, limit - int(count.item()))
        if room == 0:  # the same on every rank: their statistics are equal
            return
        rows = features.double()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # this rank's share of the room: what the ranks before it do not take
            counts = rows.new_zeros(torch.distributed.get_world_size())
            counts[torch.distributed.get_rank()] = rows.shape[0]
            torch.distributed.all_reduce(counts)
            before = int(counts[: torch.distributed.get_rank()].sum().item())
            rows = rows[: max(0, room - before)]
        else:
            rows = rows[:room]
        totals = torch.cat([rows.new_tensor([rows.shape[0]]), rows.sum(dim=0)])  # [1 + d]: count, sum
        if distributed:
            torch.distributed.all_reduce(totals)
        new = totals[0].item()
        if new == 0:
            return
        batch_mean = totals[1:] / new
        squares = (rows - batch_mean).square().sum(dim=0)  # [d], about the merged batch's mean
        if distributed:
            torch.distributed.all_reduce(squares)
        batch_var = squares / new
        mean, var = self.expert_gate_feature_mean[adapter_name], self.expert_gate_feature_var[adapter_name]
        seen = count.double()
        total = seen + new
        delta = batch_mean - mean.double()
        merged_mean = mean.double() + delta * new / total
        if seen == 0:
            merged_var = batch_var
        else:
            merged_var = (var.double() * seen + batch_var * new + delta.square() * seen * new / total) / total
        mean.copy_(merged_mean)
        var.copy_(merged_var)
        count.fill_(float(total))

    # Losses, merging, unloading

    @classmethod
    def aux_losses(cls, config: ExpertGateConfig, records, context: AuxLossContext) -> dict:
        return autoencoder_terms(config, records)

    def _check_merge_allowed(self):
        raise ValueError("ExpertGateModel: each sequence uses the expert its autoencoder gate chooses on the prompt, "
                         "so the experts cannot be merged into the base weights.")


def feature_size(model: nn.Module) -> int:
    """d: the width of the hidden states the autoencoders read (the input embeddings' width)."""
    return model.get_input_embeddings().weight.shape[-1]


def new_autoencoders(num_tasks: int, hidden: int, code: int, device) -> list[torch.Tensor]:
    """W_e [K, h, d], b_e [K, h], W_d [K, d, h], b_d [K, d] fp32, each task's as nn.Linear(d, h) and nn.Linear(h, d)
    initialise them (kaiming-uniform(a=sqrt(5)) weights, uniform(+-1/sqrt(fan_in)) biases)."""
    shapes = ((num_tasks, code, hidden), (num_tasks, code), (num_tasks, hidden, code), (num_tasks, hidden))
    tensors = [torch.empty(shape, device=device, dtype=torch.float32) for shape in shapes]
    for weight, bias in ((tensors[0], tensors[1]), (tensors[2], tensors[3])):
        for matrix in weight:
            nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
        bound = 1 / math.sqrt(weight.shape[-1])
        nn.init.uniform_(bias, -bound, bound)
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# Using a trained gate: decisions, statistics, relatedness, new tasks


def _tuner(model) -> ExpertGateModel:
    tuner = model if isinstance(model, ExpertGateModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, ExpertGateModel):
        raise TypeError(f"expected a PeftModel with an Expert Gate adapter, got {type(model).__name__}.")
    return tuner


def _features(tuner: ExpertGateModel, adapter_name: str, batch: dict) -> torch.Tensor:
    """The frozen prompt features [B, d] of one batch (input_ids, attention_mask, labels as a forward takes them)."""
    layer = tuner.peft_config[adapter_name].feature_layer
    inputs = {name: batch.get(name) for name in ("input_ids", "attention_mask", "labels")}
    mask = prompt_mask((), inputs)
    return prompt_features(tuner.model, layer, mask, input_ids=inputs["input_ids"],
                           attention_mask=inputs["attention_mask"])


@torch.no_grad()
def route_prompts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None, adapter_name: str = "default") -> GateDecision:
    """The gate's decision on a batch (the prompt: the tokens before the first label != -100; every token without
    labels), as an evaluation forward takes it: errors, relevance and the chosen expert of every sequence."""
    tuner = _tuner(model)
    features = _features(tuner, adapter_name, {"input_ids": input_ids, "attention_mask": attention_mask,
                                               "labels": labels})
    return tuner.autoencoder_gate(features, adapter_name)


@torch.no_grad()
def calibrate_feature_statistics(model, batches, adapter_name: str = "default") -> int:
    """Add the prompt features of `batches` (dicts with input_ids and optionally attention_mask and labels) to the
    standardisation statistics, up to `statistics_samples` prompts in all, before training: the autoencoders then
    train on fixed inputs from the first step. Under data parallelism every rank calls it with its own share of the
    batches, the same number of batches on each, and the statistics merge every rank's prompts. Returns the number of
    prompts in the statistics."""
    tuner = _tuner(model)
    limit = tuner.peft_config[adapter_name].statistics_samples
    for batch in batches:
        if int(tuner.expert_gate_feature_count[adapter_name].item()) >= limit:
            break
        tuner._update_statistics(adapter_name, _features(tuner, adapter_name, batch), limit)
    return int(tuner.expert_gate_feature_count[adapter_name].item())


@torch.no_grad()
def task_relatedness(model, batches, task: str, adapter_name: str = "default") -> dict[str, float]:
    """Rel(T_task, T_a) for every other task a (the paper's eq. 2), from the mean reconstruction errors on `batches`
    (the task's validation data: dicts with input_ids, attention_mask, labels) of the task's autoencoder (Er_k,
    trained first) and of each other task's autoencoder (Er_a). The most related task's expert is the one to start
    the new expert from (`copy_expert`)."""
    tuner = _tuner(model)
    config = tuner.peft_config[adapter_name]
    new = config.task_id(task)
    totals, count = None, 0
    for batch in batches:
        errors = tuner.autoencoder_gate(_features(tuner, adapter_name, batch), adapter_name).errors
        totals = errors.sum(dim=0) if totals is None else totals + errors.sum(dim=0)
        count += errors.shape[0]
    if not count:
        raise ValueError("task_relatedness needs at least one batch of the task's data.")
    mean_errors = (totals / count).tolist()
    return {name: relatedness(mean_errors[new], mean_errors[index])
            for index, name in enumerate(config.task_names) if index != new}


def _replace_rows(container: nn.ParameterDict, adapter_name: str, value: torch.Tensor) -> None:
    old = container[adapter_name]
    container[adapter_name] = nn.Parameter(value, requires_grad=old.requires_grad)


@torch.no_grad()
def add_task(model, name: str, adapter_name: str = "default") -> int:
    """Append task `name` to a trained Expert Gate adapter: a fresh LoRA expert (A kaiming-uniform, B zero) in every
    adapted Linear and a fresh autoencoder, with id num_tasks; the old experts, autoencoders and task ids are
    unchanged, and the standardisation statistics are frozen where they are (`statistics_samples` becomes the
    number of prompts in them), so that the old autoencoders keep their inputs. Returns the new task's id. The
    parameters are new tensors: build the optimizer (the Trainer) afterwards."""
    tuner = _tuner(model)
    config = tuner.peft_config[adapter_name]
    _require(config.task_names is not None and name not in config.task_names, "task_names", config.task_names,
             f"needs names to add a task to, without {name!r} already")
    new_id = config.num_tasks
    count = int(tuner.expert_gate_feature_count[adapter_name].item())
    config.statistics_samples = min(config.statistics_samples, count)
    weights = [getattr(tuner, container)[adapter_name] for container in AUTOENCODER_PARAMETERS]
    fresh = new_autoencoders(1, weights[0].shape[-1], weights[0].shape[1], weights[0].device)
    for container, old, new in zip(AUTOENCODER_PARAMETERS, weights, fresh):
        _replace_rows(getattr(tuner, container), adapter_name, torch.cat([old.detach(), new.to(old.dtype)]))
    for module in tuner.model.modules():
        if isinstance(module, ExpertGateLinear) and adapter_name in module.expert_gate_A:
            lora_a, lora_b = module.expert_gate_A[adapter_name], module.expert_gate_B[adapter_name]
            new_a = torch.empty_like(lora_a[:1])
            nn.init.kaiming_uniform_(new_a[0], a=math.sqrt(5))
            _replace_rows(module.expert_gate_A, adapter_name, torch.cat([lora_a.detach(), new_a]))
            _replace_rows(module.expert_gate_B, adapter_name, torch.cat([lora_b.detach(),
                                                                         torch.zeros_like(lora_b[:1])]))
            module.num_experts[adapter_name] = new_id + 1
    config.task_names = [*config.task_names, name]
    config.num_tasks = new_id + 1
    return new_id


@torch.no_grad()
def copy_expert(model, source: str, target: str, adapter_name: str = "default") -> int:
    """Start task `target`'s LoRA expert from task `source`'s in every adapted Linear (the paper's prior model: the
    most related task's, `task_relatedness`). Returns the number of Linears copied."""
    tuner = _tuner(model)
    config = tuner.peft_config[adapter_name]
    source_id, target_id = config.task_id(source), config.task_id(target)
    copied = 0
    for module in tuner.model.modules():
        if isinstance(module, ExpertGateLinear) and adapter_name in module.expert_gate_A:
            for container in (module.expert_gate_A, module.expert_gate_B):
                container[adapter_name][target_id] = container[adapter_name][source_id]
            copied += 1
    return copied


__all__ = [
    "EXPERT_GATE",
    "ExpertGateConfig",
    "ExpertGateLinear",
    "ExpertGateModel",
    "ExpertGateRecord",
    "GateDecision",
    "add_task",
    "calibrate_feature_statistics",
    "copy_expert",
    "route_prompts",
    "task_relatedness",
]
