"""MoCLE, Mixture of Cluster-conditional LoRA Experts (Gou et al., arXiv 2312.12379, "for Vision-language Instruction
Tuning"): the instructions are clustered; each cluster's learned embedding chooses, in every adapted module, one of E
LoRA experts; a universal LoRA expert, used by every sequence, helps on instructions unlike the training ones.

Every sequence b of a forward belongs to one cluster k_b, decided once from its prompt and kept for every generated
token. For a targeted Linear W with LoRA experts (A_i, B_i), i < E, the universal expert (A_U, B_U), a cluster
embedding table C [K, d_c] and a gate (W_g [E, d_c], b_g [E]):

    f_b   = normalise(mean over the prompt tokens of b of h_l)       h_l: the frozen base's hidden state after
    k_b   = argmin_k || f_b - mu_k ||                                 decoder layer `feature_layer`; mu: centroids
    g_b   = softmax((W_g C[k_b] + b_g + eps) / tau)     [E]          eps ~ N(0, router_noise_std^2), training only
    i_b   = argmax g_b                                               top-1
    y[b, s] = W x[b, s] + bias + w_E * s B_{i_b} A_{i_b} x'[b, s] + w_U * s_U B_U A_U x'[b, s]

with s = lora_alpha / r, s_U = lora_alpha / universal_r (over sqrt of the ranks with rsLoRA), x' = dropout(x) (one
mask per layer call, shared by both experts) and, by `universal_mixing`, (w_E, w_U) = (g_{b, i_b}, 1 - g_{b, i_b})
("complement"), (g_{b, i_b}, 1) ("add") or (g_{b, i_b}^2, 1 - g_{b, i_b}) ("complement_squared"). Since g depends on
the cluster alone, every token of a sequence uses the same expert and weights.

The centroids mu [K, hidden] are k-means centroids of the training prompts' features f, fitted before training by
`fit_clusters` (a recipe with method `mocle` calls it on its training data) and saved with the adapter, once (in the
first adapted module), untrained. A forward whose adapter's centroids were never fitted is an error. The cluster is a
model-level decision (`PromptRouting.decide`), taken on the prompt (every real token before the first label !=
-100; every real token without labels), so a training forward on prompt + response clusters as the inference
forward on the prompt does, and `generate` keeps it for every new token, with or without a cache.

What was checked, and where:

- the abstract (arXiv 2312.12379v5 and the Hugging Face papers page): instructions clustered, expert activation
  conditioned on the instruction's cluster, a separate universal expert for generalisation to novel instructions;
- the authors' code, github gyhdog99/MoCLE (`mocle.py`, `mocle.yaml`, `README.md` and their modified
  `peft-main/src/peft/tuners/lora/layer.py` and `model.py`, commit 68282ec): the instruction alone (training:
  `text_input`; generation: the prompt) is embedded by the frozen sentence encoder all-MiniLM-L6-v2 (mean pooling then
  L2 normalisation, 384 dims) and assigned by a pre-fitted k-means model (`kmeans.predict`: nearest centroid);
  K = 64 clusters in the shipped config, released checkpoints with K 16 and 64 and temperatures 0.05 and 0.1;
  every adapted Linear has its own cluster embedding nn.Embedding(K, 384) and gate nn.Linear(384, E) (with a bias),
  E = 4 experts, top-1, Gaussian noise of std 0.1 added to the gate logits in training only, then the softmax over
  logits / temperature (0.05 in the config); the universal expert (`g_enable`) is one more LoRA, mixed as
  y_e * w + y_U * (1 - w) with w the top-1 gate, where y_e is already gate-weighted (the dispatcher's `combine`
  multiplies by the gate), so the code computes g^2 on the expert: `universal_mixing="complement_squared"`
  reproduces it, the default "complement" weighs the expert by g once; LoRA r 8, alpha 32, dropout 0.1 on peft's
  default Llama targets (q_proj, v_proj), each expert initialised as peft's LoRA (A kaiming-uniform, B zero), on
  Vicuna-7B inside InstructBLIP; no auxiliary loss is added (the model returns the LM loss alone; the layer's
  load-balancing helpers are unused), and there is none here.

Our reading, not checked against the paper's body (which was not available here): the cluster features are the
frozen base model's own hidden states (no external encoder can be loaded here), mean-pooled over the prompt and L2
normalised as MiniLM's are, after decoder layer `feature_layer` (default: half the depth, as middle layers of a
decoder pool into better sentence features than its embeddings, a bag of words, or its last layers, which specialise
in the next token; the cost is that part of a frozen forward once per prompt); the k-means (k-means++ seeding, then
Lloyd's iterations, Euclidean on the normalised features, as scikit-learn's KMeans on MiniLM's unit vectors) runs in
torch, seeded by `kmeans_seed`; one dropout mask per layer call for both experts (the reference draws one per
expert); "complement" as the default mixing. Each is a field but the feature source.
"""

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .config import LoraExpertConfig, _help, _number, _positive_int, _require, lora_scaling
from .functional import sequence_lora
from .layer import LinearWithExperts, LoraExpertLayer, RoutingRecord, _batch_size
from .model import SUPPORTED_MODEL_TYPES, LoraExpertTuner
from .peft_types import add_peft_type
from .prompt_routing import (
    PromptRouting,
    SequenceRoutedLayer,
    prompt_features,
    prompt_mask,
)

logger = logging.getLogger(__name__)

MOCLE = add_peft_type("MOCLE")
UNIVERSAL_MIXING = ("complement", "add", "complement_squared")
CLUSTER_KEY = "mocle_cluster"  # PromptRouting.decide key: (CLUSTER_KEY, adapter name)
# default target_modules: peft's LoRA default for Llama-style bases, which the authors' LoraConfig left in place
TARGET_MODULES = {model_type: ["q_proj", "v_proj"] for model_type in SUPPORTED_MODEL_TYPES}
ROUTER_CONTAINERS = ("mocle_cluster_embedding", "mocle_gate", "mocle_gate_bias", "mocle_centroids")


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class MocleConfig(LoraExpertConfig):
    """MoCLE: every targeted Linear gets `num_experts` LoRA experts of rank r, a universal LoRA expert (rank
    `universal_r`), a cluster embedding table [num_clusters, cluster_embedding_dim] and a gate; each sequence's
    prompt falls in one of `num_clusters` k-means clusters, whose embedding picks one expert (top-1) per module (see
    the module's docstring for the formula). The centroids are fitted on the training prompts by `fit_clusters`
    before training and saved with the adapter.

    Defaults: the authors' code and shipped config (github gyhdog99/MoCLE): 4 experts, 64 clusters, cluster embedding
    384 (MiniLM's width there), temperature 0.05, noise std 0.1, universal expert on, r 8, alpha 32, dropout 0.1 on
    q_proj and v_proj. Mixing "complement" (expert g, universal 1 - g; the code's own arithmetic is
    "complement_squared"), features after the middle decoder layer, k-means seed 0 and at most 300 iterations (scikit-
    learn's KMeans default, which the reference's joblib k-means model suggests) are ours.
    """

    r: int = field(default=8, metadata=_help("Rank of each LoRA expert."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling numerator: lora_alpha / r (and / universal_r)."))
    lora_dropout: float = field(default=0.1, metadata=_help("Dropout on the LoRA inputs (one mask per layer call, "
                                                             "shared by the chosen and the universal expert)."))
    num_experts: int = field(default=4, metadata=_help("LoRA experts per targeted Linear, of which each sequence "
                                                       "uses one (top-1)."))
    num_clusters: int = field(default=64, metadata=_help("K, the number of k-means clusters of the prompts; each has "
                                                         "a learned embedding in every adapted Linear."))
    cluster_embedding_dim: int = field(default=384, metadata=_help("d_c, the width of the cluster embeddings that "
                                                                   "the gates read."))
    router_temperature: float = field(default=0.05, metadata=_help("tau: gate = softmax(logits / tau); > 0."))
    router_noise_std: float = field(default=0.1, metadata=_help("Std of the Gaussian noise added to the gate logits "
                                                                "in training (before the temperature); 0 = none."))
    universal_expert: bool = field(default=True, metadata=_help("Add the universal LoRA expert, used by every "
                                                                "sequence."))
    universal_r: int | None = field(default=None, metadata=_help("Rank of the universal expert; None = r."))
    universal_mixing: str = field(
        default="complement", metadata=_help(f"Weights of (chosen expert, universal expert), one of "
                                             f"{list(UNIVERSAL_MIXING)}: (g, 1 - g), (g, 1) or (g^2, 1 - g), g the "
                                             f"chosen expert's gate."))
    feature_layer: int | None = field(
        default=None, metadata=_help("Cluster features: the frozen base's hidden state after this decoder layer (0 = "
                                     "the input embeddings), mean-pooled over the prompt; None = half the depth "
                                     "(resolved and saved when the adapter is built)."))
    kmeans_seed: int = field(default=0, metadata=_help("Seed of fit_clusters' k-means++ initialisation."))
    kmeans_iterations: int = field(default=300, metadata=_help("Most Lloyd iterations of fit_clusters' k-means (it "
                                                               "stops earlier once no prompt changes cluster)."))

    routes_per_sequence = True  # the cluster is decided on the prompt, kept while generating (prompt_routing.py)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MOCLE
        for name in ("num_experts", "num_clusters", "cluster_embedding_dim", "kmeans_iterations"):
            _require(_positive_int(getattr(self, name)), name, getattr(self, name), "must be a positive integer")
        _require(_number(self.router_temperature) and self.router_temperature > 0, "router_temperature",
                 self.router_temperature, "must be > 0")
        _require(_number(self.router_noise_std) and self.router_noise_std >= 0, "router_noise_std",
                 self.router_noise_std, "must be >= 0 (0 = no noise)")
        _require(isinstance(self.universal_expert, bool), "universal_expert", self.universal_expert,
                 "must be true or false")
        _require(self.universal_r is None or _positive_int(self.universal_r), "universal_r", self.universal_r,
                 "must be None (= r) or a positive integer")
        _require(self.universal_mixing in UNIVERSAL_MIXING, "universal_mixing", self.universal_mixing,
                 f"allowed values: {list(UNIVERSAL_MIXING)}")
        _require(self.feature_layer is None or (isinstance(self.feature_layer, int)
                                                and not isinstance(self.feature_layer, bool)
                                                and self.feature_layer >= 0),
                 "feature_layer", self.feature_layer, "must be None (half the depth) or an int >= 0 (0 = the input "
                 "embeddings, l = after decoder layer l)")
        _require(isinstance(self.kmeans_seed, int) and not isinstance(self.kmeans_seed, bool), "kmeans_seed",
                 self.kmeans_seed, "must be an integer")

    @property
    def universal_rank(self) -> int:
        return self.universal_r if self.universal_r is not None else self.r

    @property
    def universal_scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.universal_rank, self.use_rslora)


# ----------------------------------------------------------------------------------------------------------------
# k-means


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [K, d] fp32
    assignments: torch.Tensor  # [N] long: the nearest centroid of every point
    inertia: float  # sum over the points of the squared distance to their centroid
    iterations: int  # Lloyd iterations run


def squared_distances(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[N, d], [K, d] -> [N, K] squared Euclidean distances (fp32, >= 0)."""
    points, centroids = points.float(), centroids.float()
    products = points @ centroids.T
    return (points.square().sum(-1, keepdim=True) - 2 * products + centroids.square().sum(-1)).clamp_min(0)


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[N] long: the index of each point's nearest centroid (the lowest index on a tie)."""
    return squared_distances(points, centroids.to(points.device)).argmin(dim=-1)


def kmeans(points: torch.Tensor, num_clusters: int, seed: int = 0, max_iterations: int = 300) -> KMeansResult:
    """k-means of `points` [N, d] (Euclidean), deterministic for a seed on one device.

    Seeding is k-means++ (Arthur and Vassilvitskii 2007): the first centroid is a uniformly random point, each next one
    a point drawn with probability proportional to its squared distance to the nearest centroid so far (random
    numbers from a CPU generator seeded with `seed`). Then Lloyd's iterations: assign every point to its nearest
    centroid, move every centroid to the mean of its points; stop when no assignment changes or after
    `max_iterations`. A centroid left without points moves to the point farthest from its own centroid. Raises a
    ValueError naming `num_clusters` when the points have fewer distinct values than clusters."""
    points = points.float()
    count = points.shape[0]
    _require(_positive_int(num_clusters) and count >= num_clusters, "num_clusters", num_clusters,
             f"k-means needs at least num_clusters points, and {count} were given: lower num_clusters or give more "
             f"prompts")
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(count, (1,), generator=generator))]
    closest = squared_distances(points, points[chosen]).squeeze(1)  # [N]
    for _ in range(1, num_clusters):
        weights = closest.double().cpu()
        if not weights.sum() > 0:
            raise ValueError(f"`num_clusters`={num_clusters} is invalid: the prompts' features have only "
                             f"{len(chosen)} distinct values; lower num_clusters or give more varied prompts.")
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        closest = torch.minimum(closest, squared_distances(points, points[chosen[-1:]]).squeeze(1))
    centroids = points[chosen].clone()
    assignments, iterations = None, 0
    for iterations in range(1, max_iterations + 1):
        distances = squared_distances(points, centroids)
        new = distances.argmin(dim=-1)
        if assignments is not None and torch.equal(new, assignments):
            break
        assignments = new
        members = F.one_hot(assignments, num_clusters).to(points.dtype)  # [N, K]: matmul sums, deterministic
        sizes = members.sum(dim=0)
        centroids = (members.T @ points) / sizes.clamp_min(1)[:, None]
        own = distances.gather(1, assignments[:, None]).squeeze(1)
        for empty in (sizes == 0).nonzero().flatten().tolist():
            farthest = int(own.argmax())
            centroids[empty] = points[farthest]
            own[farthest] = -1
    assignments = nearest_centroid(points, centroids)
    inertia = float(squared_distances(points, centroids).gather(1, assignments[:, None]).sum())
    return KMeansResult(centroids, assignments, inertia, iterations)


# ----------------------------------------------------------------------------------------------------------------
# Layer


@dataclass
class ClusterRoutingRecord(RoutingRecord):
    """One MoCLE gate call: `logits` [B, E] = the (noisy) gate logits / temperature, so softmax(logits) is the gate;
    `top_k_index` [B, 1] the chosen expert; `clusters` [B] the sequences' clusters."""

    clusters: torch.Tensor | None = None


@dataclass(frozen=True)
class MocleSettings:
    """The routing settings of one adapter (see `MocleConfig`)."""

    feature_layer: int
    temperature: float
    noise_std: float
    mixing: str
    universal_scaling: float


class MocleLinear(LinearWithExperts, SequenceRoutedLayer):
    """A frozen Linear plus E LoRA experts of rank r, of which each sequence uses the one its cluster's gate picks,
    and a universal LoRA expert (module docstring). A [E, r, in], B [E, out, r], universal_A [r_U, in], universal_B
    [out, r_U], cluster_embedding [K, d_c], gate [E, d_c], gate_bias [E]; centroids [K, hidden] live in the model's
    first adapted Linear only (`centroid_owner` points the others to it). `prompt_routing` is set by the model's
    prompt-routing hook before every forward."""

    adapter_layer_names = ("mocle_cluster_embedding", "mocle_gate", "mocle_gate_bias", "mocle_A", "mocle_B",
                           "mocle_universal_A", "mocle_universal_B", "mocle_centroids")
    other_param_names = (*LoraExpertLayer.other_param_names, "settings", "centroid_owner")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: MocleConfig, hidden_size: int,
                 layer_index: int | None = None):
        super().__init__()
        self._init_linear(base_layer, layer_index)
        self.prompt_routing: PromptRouting | None = None
        self.settings: dict[str, MocleSettings] = {}
        self.centroid_owner: dict[str, MocleLinear] = {}  # adapter -> the layer holding its centroids
        self.frozen_peft_weight_names = {}  # per layer: peft's class-level default is shared
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, hidden_size=hidden_size)

    def update_layer(self, adapter_name: str, config: MocleConfig, hidden_size: int, **_) -> None:
        base, experts = self.get_base_layer(), config.num_experts
        self.settings[adapter_name] = MocleSettings(config.feature_layer, config.router_temperature,
                                                    config.router_noise_std, config.universal_mixing,
                                                    config.universal_scaling)
        self.frozen_peft_weight_names[adapter_name] = ("mocle_centroids",)  # before _add_adapter's set_adapter
        shapes = {"mocle_cluster_embedding": (config.num_clusters, config.cluster_embedding_dim),
                  "mocle_gate": (experts, config.cluster_embedding_dim), "mocle_gate_bias": (experts,),
                  "mocle_A": (experts, config.r, base.in_features), "mocle_B": (experts, base.out_features, config.r),
                  "mocle_centroids": (config.num_clusters, hidden_size)}
        if config.universal_expert:
            shapes["mocle_universal_A"] = (config.universal_rank, base.in_features)
            shapes["mocle_universal_B"] = (base.out_features, config.universal_rank)
        self._add_adapter(adapter_name, config, shapes, num_experts=experts, top_k=1)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, config: MocleConfig) -> None:
        """As the reference's modules: cluster embedding ~ N(0, 1) (nn.Embedding), gate kaiming-uniform(a=sqrt(5))
        and bias U(-1/sqrt(d_c), 1/sqrt(d_c)) (nn.Linear; with router_init_std: N(0, std) and zero), every LoRA's A
        kaiming-uniform and B zero (random too with init_lora_weights=False); centroids NaN until fitted."""
        tensors = self.adapter_tensors(adapter_name)
        nn.init.normal_(tensors["cluster_embedding"])
        if config.router_init_std is not None:
            nn.init.normal_(tensors["gate"], std=config.router_init_std)
            nn.init.zeros_(tensors["gate_bias"])
        else:
            nn.init.kaiming_uniform_(tensors["gate"], a=5 ** 0.5)
            bound = config.cluster_embedding_dim ** -0.5
            nn.init.uniform_(tensors["gate_bias"], -bound, bound)
        for name in ("A", "B", "universal_A", "universal_B"):
            if name not in tensors:
                continue
            if name.endswith("B") and config.init_lora_weights:
                nn.init.zeros_(tensors[name])
            else:
                for matrix in tensors[name].view(-1, *tensors[name].shape[-2:]):
                    nn.init.kaiming_uniform_(matrix, a=5 ** 0.5)
        tensors["centroids"].fill_(float("nan"))

    def use_centroids_of(self, adapter_name: str, owner: "MocleLinear") -> None:
        """Drop this layer's centroids of the adapter and read `owner`'s (the tuner calls it on every adapted Linear
        but the first, so that the adapter saves its centroids once)."""
        del self.mocle_centroids[adapter_name]
        self.centroid_owner[adapter_name] = owner

    def centroids(self, adapter_name: str) -> torch.Tensor:
        """[K, hidden]: the adapter's k-means centroids (NaN until fitted)."""
        return self.centroid_owner.get(adapter_name, self).mocle_centroids[adapter_name]

    def parameter_group(self, layer_name: str) -> str:
        return "router" if layer_name in ROUTER_CONTAINERS else "experts"

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors without the prefix: cluster_embedding, gate, gate_bias, A, B, universal_A,
        universal_B (when the adapter has the universal expert), centroids (in the owner only)."""
        return {name.removeprefix(MocleModel.prefix): getattr(self, name)[adapter_name]
                for name in self.adapter_layer_names if adapter_name in getattr(self, name)}

    def prompt_feature_layers(self) -> set[int]:
        return {self.settings[name].feature_layer for name in self._adapters_to_run() if name in self.settings}

    def _experts(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        weights, settings = self.adapter_tensors(adapter_name), self.settings[adapter_name]
        batch = _batch_size(x)
        tokens = x.reshape(batch, -1, x.shape[-1]).to(weights["A"].dtype)  # [B, S, in]
        gate, experts = self.gate(self.clusters(batch, adapter_name), adapter_name)  # [B] fp32, [B]
        expert_weight, universal_weight = mixing_weights(gate, settings.mixing)
        dropped = self.lora_dropout[adapter_name](tokens)
        delta = sequence_lora(dropped, weights["A"], weights["B"], experts,
                              expert_weight * self.scaling[adapter_name])  # [B, S, out]
        if "universal_A" in weights:
            scale = (universal_weight * settings.universal_scaling).to(dropped.dtype)[:, None, None]
            delta = delta + F.linear(F.linear(dropped, weights["universal_A"]) * scale, weights["universal_B"])
        return delta.view(*x.shape[:-1], -1)

    def gate(self, clusters: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_{b, i_b} [B] fp32, i_b [B]) of every sequence's cluster: softmax((W_g C[k] + b_g + noise) / tau), its
        top-1; the noise only in training. Recorded while recording is on."""
        weights, settings = self.adapter_tensors(adapter_name), self.settings[adapter_name]
        embedding = weights["cluster_embedding"][clusters.to(weights["cluster_embedding"].device)]  # [B, d_c]
        logits = F.linear(embedding, weights["gate"], weights["gate_bias"]).float()  # [B, E]
        if self.training and settings.noise_std > 0:
            logits = logits + torch.randn_like(logits) * settings.noise_std
        logits = logits / settings.temperature
        probs = torch.softmax(logits, dim=-1)
        experts = probs.argmax(dim=-1)
        if self._records is not None:
            self._records.append(ClusterRoutingRecord(adapter_name, self.layer_index, logits, experts[:, None],
                                                      clusters.shape[0], clusters=clusters))
        return probs.gather(1, experts[:, None]).squeeze(1), experts

    def clusters(self, batch: int, adapter_name: str) -> torch.Tensor:
        """[B] long: every sequence's cluster, decided once per prompt for the whole model (the first layer to ask
        computes it; decoding steps and a recomputation keep it)."""
        routing, key = self.prompt_routing, (CLUSTER_KEY, adapter_name)
        if routing is None:
            raise ValueError("MoCLE decides each sequence's cluster on its prompt when the model runs: call the "
                             "PeftModel (whose prompt-routing hook prepares it), not a MoCLE layer alone.")
        if key not in routing.choices and routing.continuing:
            raise ValueError("MoCLE decides each sequence's cluster on its prompt, but this forward continues a "
                             "cache that no prompt forward of this model returned: decode with `generate`, or pass "
                             "the cache returned by the prompt's forward.")
        clusters = routing.decide(key, lambda: self._nearest_clusters(routing, adapter_name))
        if clusters.shape[0] != batch:
            raise ValueError(f"MoCLE decided the clusters of {clusters.shape[0]} sequences on the prompt, but this "
                             f"forward has {batch}.")
        return clusters

    def _nearest_clusters(self, routing: PromptRouting, adapter_name: str) -> torch.Tensor:
        centroids = self.centroids(adapter_name)
        check_fitted(centroids, adapter_name)
        layer = self.settings[adapter_name].feature_layer
        if layer not in routing.features:
            raise RuntimeError(f"MoCLE needs the prompt features of decoder layer {layer}, which this forward did "
                               f"not compute.")
        return nearest_centroid(F.normalize(routing.features[layer], dim=-1), centroids)


def mixing_weights(gate: torch.Tensor, mixing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight of the chosen expert, weight of the universal expert), each [B], from its gate g [B]."""
    if mixing == "add":
        return gate, torch.ones_like(gate)
    return (gate * gate if mixing == "complement_squared" else gate), 1 - gate


def check_fitted(centroids: torch.Tensor, adapter_name: str) -> None:
    if bool(torch.isnan(centroids).any()):
        raise ValueError(f"the cluster centroids of the MoCLE adapter {adapter_name!r} were never fitted, so no "
                         f"sequence can be given a cluster: call hf_moe.finetune.lora_moe.mocle.fit_clusters(model, "
                         f"batches) on the training prompts before training (a recipe with method 'mocle' does), or "
                         f"load a trained adapter.")


# ----------------------------------------------------------------------------------------------------------------
# Tuner


class MocleModel(LoraExpertTuner):
    """MoCLE: Linears -> `MocleLinear` (E LoRA experts, top-1 per sequence by its prompt's cluster, and a universal
    expert). No auxiliary loss (the reference has none). The first adapted Linear (in module order, so the same one
    when the adapter is loaded again) keeps the adapter's centroids; every other one reads them there."""

    prefix = "mocle_"
    tuner_layer_cls = MocleLinear
    target_module_mapping = TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: MocleConfig, model_config: dict) -> MocleConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        depth = model_config.get("num_hidden_layers")
        if peft_config.feature_layer is None:
            if not _positive_int(depth):
                raise ValueError("MoCLE's `feature_layer` is None (half the depth) but the base model's config has no "
                                 "`num_hidden_layers`: set feature_layer.")
            peft_config.feature_layer = max(1, depth // 2)
        elif _positive_int(depth):
            _require(peft_config.feature_layer <= depth, "feature_layer", peft_config.feature_layer,
                     f"must be in [0, {depth}] for this base of {depth} decoder layers")
        return peft_config

    def _layer_options(self, config, key, layer_index) -> dict:
        embeddings = self.model.get_input_embeddings()
        hidden = getattr(embeddings, "embedding_dim", None) or self.model.config.hidden_size
        return {"hidden_size": hidden}

    def _new_layer(self, config, adapter_name, target, key, layer_index, options) -> nn.Module:
        return MocleLinear(target, adapter_name, config, layer_index=layer_index, **options)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        super()._create_and_replace(peft_config, adapter_name, target, target_name, parent, current_key, **kwargs)
        layer = getattr(parent, target_name)
        owner = next(module for module in self.model.modules()  # the first layer that kept the adapter's centroids
                     if isinstance(module, MocleLinear) and adapter_name in module.mocle_centroids)
        if owner is not layer:
            layer.use_centroids_of(adapter_name, owner)

    def _check_merge_allowed(self):
        raise ValueError("MocleModel: each sequence uses the expert its cluster's gate picks, so the experts cannot be "
                         "merged into the base weights.")


# ----------------------------------------------------------------------------------------------------------------
# Fitting the clusters


@dataclass
class ClusterFit:
    """What `fit_clusters` found: the centroids it stored and the clusters of the prompts it saw."""

    centroids: torch.Tensor  # [K, hidden] fp32, of the L2-normalised features
    assignments: torch.Tensor  # [N] long: each prompt's cluster, in the order given
    sizes: torch.Tensor  # [K] long: prompts per cluster
    inertia: float
    iterations: int


def _owner_layer(model: nn.Module, adapter_name: str) -> MocleLinear:
    for module in model.modules():
        if isinstance(module, MocleLinear) and adapter_name in module.mocle_centroids:
            return module
    raise ValueError(f"the model has no MoCLE adapter named {adapter_name!r}.")


def _batch_inputs(batch, device: torch.device) -> dict:
    """input_ids [B, S] (and attention_mask, labels when given) of one batch: a tensor of input ids, or a mapping
    (a collated batch, or one tokenized row of lists) with `input_ids`."""
    if not isinstance(batch, Mapping):
        batch = {"input_ids": batch}
    if "input_ids" not in batch:
        raise ValueError(f"fit_clusters reads tokenized prompts: each batch needs `input_ids`, got {sorted(batch)}.")
    inputs = {}
    for name in ("input_ids", "attention_mask", "labels"):
        if batch.get(name) is None:
            continue
        value = torch.as_tensor(batch[name], device=device)
        inputs[name] = value if value.dim() > 1 else value[None]
    return inputs


@torch.no_grad()
def prompt_feature_matrix(model: nn.Module, batches: Iterable, layer: int, max_prompts: int | None = None
                          ) -> torch.Tensor:
    """[N, hidden] fp32: the L2-normalised frozen prompt features (`prompt_routing.prompt_features` after decoder
    layer `layer`) of every sequence of `batches`, as a MoCLE forward computes them: the prompt is each sequence's
    real tokens before its first label != -100 (all of them without labels)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    features, total = [], 0
    for batch in batches:
        inputs = _batch_inputs(batch, device)
        mask = prompt_mask((), inputs)
        features.append(prompt_features(base, layer, mask, input_ids=inputs["input_ids"],
                                        attention_mask=inputs.get("attention_mask")))
        total += features[-1].shape[0]
        if max_prompts is not None and total >= max_prompts:
            break
    if not features:
        raise ValueError("fit_clusters got no batch: give the training prompts (tokenized, with input_ids).")
    matrix = torch.cat(features)
    return F.normalize(matrix[:max_prompts] if max_prompts is not None else matrix, dim=-1)


def fit_clusters(model: nn.Module, batches: Iterable, adapter_name: str | None = None,
                 max_prompts: int | None = None) -> ClusterFit:
    """Fit the MoCLE adapter's cluster centroids on the prompts of `batches` and store them in the model.

    `model`: a PeftModel (or the adapted transformers model) with a MoCLE adapter (`adapter_name`, default the active
    one). `batches`: an iterable of tokenized batches, such as a DataLoader over the training set: mappings with
    `input_ids` [B, S] (or [S]; tensors or lists), optionally `attention_mask` and `labels` (the prompt is every real
    token before the first label != -100, as in training), or input-id tensors (the whole sequence is the prompt).
    `max_prompts` caps the number of prompts read. Runs `kmeans` with the adapter's `num_clusters`, `kmeans_seed`
    and `kmeans_iterations` on the L2-normalised frozen prompt features after decoder layer `feature_layer`."""
    configs = getattr(model, "peft_config", {})
    if adapter_name is None:
        adapter_name = getattr(model, "active_adapter", "default")
        adapter_name = adapter_name[0] if isinstance(adapter_name, list) else adapter_name
    config = configs.get(adapter_name)
    if not isinstance(config, MocleConfig):
        raise TypeError(f"fit_clusters fits a MoCLE adapter, but the model's adapter {adapter_name!r} is "
                         f"{type(config).__name__}.")
    owner = _owner_layer(model, adapter_name)
    features = prompt_feature_matrix(model, batches, config.feature_layer, max_prompts)
    result = kmeans(features, config.num_clusters, seed=config.kmeans_seed, max_iterations=config.kmeans_iterations)
    centroids = owner.mocle_centroids[adapter_name]
    with torch.no_grad():
        centroids.copy_(result.centroids.to(device=centroids.device, dtype=centroids.dtype))
    sizes = torch.bincount(result.assignments.cpu(), minlength=config.num_clusters)
    logger.info("MoCLE: %d clusters fitted on %d prompts in %d iterations (prompts per cluster: %s)",
                config.num_clusters, features.shape[0], result.iterations, sizes.tolist())
    return ClusterFit(result.centroids, result.assignments, sizes, result.inertia, result.iterations)


def fit_clusters_on_dataset(model: nn.Module, dataset, collator, batch_size: int) -> ClusterFit:
    """`fit_clusters` on a tokenized dataset, batched by `collator` in order (what a recipe with method 'mocle' runs
    on its training data before training)."""
    from torch.utils.data import DataLoader

    return fit_clusters(model, DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator))
