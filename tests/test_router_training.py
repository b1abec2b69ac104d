"""Router statistics in training: load counting over micro-batches and data-parallel ranks, per-forward router stats,
auxiliary-loss-free bias updates (DeepSeek-V3), and `MoERouterCallback` in a real `transformers.Trainer` run."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import PAD_TOKEN_ID, make_mixtral_config, random_input_ids, randomize_weights_
from datasets import Dataset
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hf_moe
from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, MixtralMoEForCausalLM

STAT_KEYS = {"load", "max_violation", "entropy", "dropped_fraction", "z_loss", "null_fraction"}


def tiny_mixtral(seed: int = 0, **overrides) -> MixtralMoEForCausalLM:
    torch.manual_seed(seed)
    return randomize_weights_(MixtralMoEForCausalLM(make_mixtral_config(**overrides)))


def top_k_loads(router_logits, top_k: int, num_experts: int, token_mask=None) -> list[torch.Tensor]:
    """Per layer: how many top-k slots of the (real) tokens each expert got, from the logits (no capacity)."""
    loads = []
    for logits in router_logits:
        index = logits.float().topk(top_k, dim=-1).indices  # [T, k]
        if token_mask is not None:
            index = index[token_mask.reshape(-1).bool()]
        loads.append(torch.bincount(index.reshape(-1), minlength=num_experts).float())
    return loads


def mean_entropy(router_logits, token_mask=None) -> list[float]:
    values = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        entropy = -(probs * probs.log()).sum(dim=-1)
        if token_mask is not None:
            entropy = entropy[token_mask.reshape(-1).bool()]
        values.append(entropy.mean().item())
    return values


# --------------------------------------------------------------------------------------------------------------
# Aux-loss-free bias updates
# --------------------------------------------------------------------------------------------------------------


def skewed_single_layer_model(update_rate: float):
    """One sparse layer, sigmoid scores + selection bias, top-1 of 4. Attention writes nothing (o_proj = 0), so the
    router sees RMSNorm(inputs_embeds); dimension 0 of every input is 2 and expert 0's router row reads it with
    weight 4, so every token prefers expert 0 (sigmoid ~1 against ~0.5 for the others)."""
    torch.manual_seed(0)
    model = tiny_mixtral(num_hidden_layers=1, num_experts_per_tok=1, scoring_func="sigmoid",
                         router_selection_bias=True, router_bias_update_rate=update_rate).train()
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.post_attention_layernorm.weight.fill_(1.0)
        layer.mlp.gate.weight.copy_(0.1 * torch.randn(4, 32))
        layer.mlp.gate.weight[:, 0] = torch.tensor([4.0, 0.0, 0.0, 0.0])
    for param in model.parameters():
        param.requires_grad_(False)  # frozen router: only the bias can balance the load
    return model


def skewed_inputs(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(4, 16, 32, generator=generator)  # T = 64 tokens
    embeds[..., 0] = 2.0
    return embeds


def test_update_router_bias_moves_each_bias_by_the_config_rate_towards_balance():
    model = skewed_single_layer_model(update_rate=0.02)
    with torch.no_grad():
        model(inputs_embeds=skewed_inputs(0))
    statistics = hf_moe.update_router_bias(model)  # gamma from config.router_bias_update_rate
    assert statistics[0]["load"].tolist() == [64.0, 0.0, 0.0, 0.0]
    bias = model.model.layers[0].mlp.gate.e_score_correction_bias
    assert_close(bias, torch.tensor([-0.02, 0.02, 0.02, 0.02]), atol=1e-7, rtol=0)


def test_aux_loss_free_bias_updates_bring_a_skewed_load_towards_balance():
    model = skewed_single_layer_model(update_rate=0.0)
    violations = []
    with torch.no_grad():
        for step in range(60):
            model(inputs_embeds=skewed_inputs(step))
            statistics = hf_moe.update_router_bias(model, update_rate=0.02)
            violations.append(statistics[0]["max_violation"].item())
    assert violations[0] == pytest.approx(3.0)  # every token on one of 4 experts
    windows = [sum(violations[i : i + 10]) / 10 for i in range(0, 60, 10)]
    assert windows[-1] < 0.3 * violations[0], windows
    assert windows[0] > 2 * max(windows[1:]), windows  # it falls within the first window and stays down
    bias = model.model.layers[0].mlp.gate.e_score_correction_bias
    assert bias[0] < bias[1:].min()  # the overloaded expert's bias went down relative to the others


# --------------------------------------------------------------------------------------------------------------
# Load counting: micro-batches, eval forwards, padding
# --------------------------------------------------------------------------------------------------------------


def test_collect_router_statistics_sums_every_training_forward_since_the_last_reset(family):
    model = family.causal_lm().train()
    config = model.config
    expected_loads = None
    entropies = []
    with torch.no_grad():
        for seed in (1, 2, 3):  # three gradient-accumulation micro-batches of 2 x 6 tokens
            out = model(random_input_ids(2, 6, seed=seed), output_router_logits=True)
            loads = top_k_loads(out.router_logits, config.num_experts_per_tok, config.num_experts)
            expected_loads = loads if expected_loads is None else [a + b for a, b in zip(expected_loads, loads)]
            entropies.append(mean_entropy(out.router_logits))
    statistics = hf_moe.collect_router_statistics(model)
    assert len(statistics) == config.num_sparse_layers
    for layer, layer_statistics in enumerate(statistics):
        assert torch.equal(layer_statistics["load"], expected_loads[layer]), layer
        assert layer_statistics["load"].sum() == 3 * 12 * config.num_experts_per_tok
        expected_entropy = sum(entropy[layer] for entropy in entropies) / 3  # equal-sized micro-batches
        assert layer_statistics["entropy"].item() == pytest.approx(expected_entropy, abs=1e-5)
    after_reset = hf_moe.collect_router_statistics(model)
    assert all(torch.all(layer["load"] == 0) for layer in after_reset)


def test_collect_router_statistics_without_reset_keeps_the_counts(family):
    model = family.causal_lm().train()
    with torch.no_grad():
        model(random_input_ids(2, 6))
    first = hf_moe.collect_router_statistics(model, reset=False)
    second = hf_moe.collect_router_statistics(model)
    assert all(torch.equal(a["load"], b["load"]) and a["load"].sum() > 0 for a, b in zip(first, second))


def test_eval_forwards_are_not_counted(family):
    model = family.causal_lm().eval()
    with torch.no_grad():
        model(random_input_ids(2, 6), output_router_logits=True)
    assert all(torch.all(layer["load"] == 0) for layer in hf_moe.collect_router_statistics(model))
    model.train()
    with torch.no_grad():
        model(random_input_ids(2, 6))
    assert all(layer["load"].sum() > 0 for layer in hf_moe.collect_router_statistics(model))


def test_padding_tokens_are_excluded_from_the_counted_loads(family):
    model = family.causal_lm().train()
    config = model.config
    input_ids = random_input_ids(2, 7)
    input_ids[1, :3] = PAD_TOKEN_ID  # left padding
    attention_mask = (input_ids != PAD_TOKEN_ID).long()
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    statistics = hf_moe.collect_router_statistics(model)
    expected = top_k_loads(out.router_logits, config.num_experts_per_tok, config.num_experts, attention_mask)
    for layer, layer_statistics in enumerate(statistics):
        assert torch.equal(layer_statistics["load"], expected[layer]), layer
        assert layer_statistics["load"].sum() == 11 * config.num_experts_per_tok  # 11 real tokens


# --------------------------------------------------------------------------------------------------------------
# Data-parallel ranks: counts are summed with one all-reduce
# --------------------------------------------------------------------------------------------------------------

DDP_SEEDS = (10, 11)  # rank r runs random_input_ids(2, 8, seed=DDP_SEEDS[r])


def _ddp_worker(rank: int, world_size: int, port: int, result_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = tiny_mixtral().train()
        with torch.no_grad():
            model(random_input_ids(2, 8, seed=DDP_SEEDS[rank]))
        statistics = hf_moe.collect_router_statistics(model)
        if rank == 0:
            torch.save([{k: v.clone() for k, v in layer.items()} for layer in statistics], result_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_collect_router_statistics_sums_loads_across_data_parallel_ranks(tmp_path):
    result_path = str(tmp_path / "rank0_statistics.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), result_path), nprocs=2, join=True)
    reduced = torch.load(result_path)

    model = tiny_mixtral().train()  # the same model, each rank's batch run separately here
    per_rank = []
    for seed in DDP_SEEDS:
        with torch.no_grad():
            model(random_input_ids(2, 8, seed=seed))
        per_rank.append(hf_moe.collect_router_statistics(model))
    assert len(reduced) == len(per_rank[0]) == 2
    for layer in range(2):
        expected_load = per_rank[0][layer]["load"] + per_rank[1][layer]["load"]
        assert torch.equal(reduced[layer]["load"], expected_load)
        assert not torch.equal(per_rank[0][layer]["load"], per_rank[1][layer]["load"])  # the ranks differ
        expected_entropy = (per_rank[0][layer]["entropy"] + per_rank[1][layer]["entropy"]) / 2  # same token count
        assert_close(reduced[layer]["entropy"], expected_entropy, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Per-forward router statistics (`output_router_stats=True`)
# --------------------------------------------------------------------------------------------------------------


def gshard_keep(top_k_index: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Written-out GShard priority: all first choices in token order, then all second choices."""
    keep = torch.zeros_like(top_k_index, dtype=torch.bool)
    used = [0] * num_experts
    for slot in range(top_k_index.shape[1]):
        for token in range(top_k_index.shape[0]):
            expert = int(top_k_index[token, slot])
            if used[expert] < capacity:
                used[expert] += 1
                keep[token, slot] = True
    return keep


def test_output_router_stats_match_values_computed_from_the_router_logits():
    # eval capacity C = ceil(0.75 * 2 * 16 / 4) = 6 slots per expert for 16 tokens x 2 slots: some are dropped
    model = tiny_mixtral(eval_capacity_factor=0.75).eval()
    with torch.no_grad():
        out = model(random_input_ids(2, 8), output_router_logits=True, output_router_stats=True)
    assert len(out.router_stats) == 2
    dropped_any = False
    for layer, (stats, logits) in enumerate(zip(out.router_stats, out.router_logits)):
        assert set(stats) == STAT_KEYS
        assert stats["load"].shape == (4,)
        assert all(stats[key].shape == () for key in STAT_KEYS - {"load"})
        probs = torch.softmax(logits.float(), dim=-1)
        index = probs.topk(2, dim=-1).indices
        keep = gshard_keep(index, 4, capacity=math.ceil(0.75 * 2 * 16 / 4))
        load = torch.bincount(index[keep], minlength=4).float()
        assert torch.equal(stats["load"], load), layer
        assert stats["max_violation"].item() == pytest.approx(load.max().item() / load.mean().item() - 1, abs=1e-6)
        assert stats["dropped_fraction"].item() == pytest.approx(1 - keep.sum().item() / 32, abs=1e-6)
        dropped_any |= bool((~keep).any())
        entropy = -(probs * probs.log()).sum(dim=-1).mean()
        assert stats["entropy"].item() == pytest.approx(entropy.item(), abs=1e-5)
        log_z = torch.logsumexp(logits.float(), dim=-1)
        assert stats["z_loss"].item() == pytest.approx(log_z.square().mean().item(), rel=1e-5)
        assert stats["null_fraction"].item() == 0.0  # no null experts (tests/test_null_experts.py has them)
    assert dropped_any


def test_output_router_stats_exclude_padding_tokens():
    model = tiny_mixtral().eval()
    input_ids = random_input_ids(2, 8)
    input_ids[0, :2] = PAD_TOKEN_ID
    attention_mask = (input_ids != PAD_TOKEN_ID).long()
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, output_router_logits=True, output_router_stats=True)
    loads = top_k_loads(out.router_logits, 2, 4, attention_mask)
    entropies = mean_entropy(out.router_logits, attention_mask)
    for stats, load, entropy in zip(out.router_stats, loads, entropies):
        assert torch.equal(stats["load"], load)
        assert stats["load"].sum() == 2 * 14
        assert stats["entropy"].item() == pytest.approx(entropy, abs=1e-5)
        assert stats["dropped_fraction"].item() == 0.0


def test_router_stats_are_absent_unless_requested():
    model = tiny_mixtral().eval()
    with torch.no_grad():
        assert model(random_input_ids(1, 5)).router_stats is None


# --------------------------------------------------------------------------------------------------------------
# MoERouterCallback in a real Trainer run
# --------------------------------------------------------------------------------------------------------------

TINY_DEEPSEEK = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
                     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": None, "n_routed_experts": 8,
                     "max_position_embeddings": 256, "pad_token_id": PAD_TOKEN_ID,
                     # the preset's multi-head latent attention, shrunk
                     "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                     "v_head_dim": 6}
BIAS_KEYS = [f"model.layers.{layer}.mlp.gate.e_score_correction_bias" for layer in (1, 2)]


def deepseek_v3_model() -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    config = DeepSeekMoEConfig.from_preset("deepseek_v3", **TINY_DEEPSEEK, num_experts_per_tok=3, n_group=4,
                                           topk_group=2, output_router_logits=True)
    return randomize_weights_(DeepSeekMoEForCausalLM(config))


def biases(model) -> dict[str, torch.Tensor]:
    return {key: model.get_buffer(key).detach().clone() for key in BIAS_KEYS}


class RecordBiases(TrainerCallback):
    """Records the biases at train begin and after every optimizer step, and the logs every later callback (a
    reporter such as TensorBoard) receives. It runs after MoERouterCallback, which `add_router_callback` puts first."""

    def __init__(self):
        self.at_begin = None
        self.after_step = {}
        self.reported_logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.reported_logs.append({**logs, "step": state.global_step})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_begin = biases(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step[state.global_step] = biases(model)


def trainer_for(model, output_dir) -> Trainer:
    rows = [{"input_ids": ids, "attention_mask": [1] * 8, "labels": ids}
            for ids in random_input_ids(16, 8, seed=4).tolist()]
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    hf_moe.add_router_callback(trainer)
    return trainer


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """A 4-step Trainer run of a tiny deepseek_v3-preset model, with checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("trainer_run")
    model = deepseek_v3_model()
    initial = biases(model)
    trainer = trainer_for(model, output_dir)
    recorder = RecordBiases()
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, initial, recorder, output_dir


def test_add_router_callback_puts_the_callback_first(trainer_run):
    trainer, _, _, _ = trainer_run
    assert isinstance(trainer.callback_handler.callbacks[0], hf_moe.MoERouterCallback)


def test_trainer_run_updates_the_selection_bias_after_each_step(trainer_run):
    trainer, initial, recorder, _ = trainer_run
    assert all(torch.all(bias == 0) for bias in initial.values())
    assert sorted(recorder.after_step) == [1, 2, 3, 4]
    previous = initial
    for step in (1, 2, 3, 4):
        for key in BIAS_KEYS:
            change = recorder.after_step[step][key] - previous[key]
            # b += gamma * sign(mean_load - load): every entry moves by 0 or +-0.001
            assert torch.all(torch.isclose(change.abs(), torch.tensor(0.001)) | (change == 0)), (step, key)
            assert change.abs().max() > 0, (step, key)
        previous = recorder.after_step[step]
    final = biases(trainer.model)
    assert all(torch.equal(final[key], recorder.after_step[4][key]) for key in BIAS_KEYS)


ROUTER_METRICS = ("max_violation", "entropy", "dropped_fraction", "z_loss")


def assert_router_metrics(train_logs: list[dict]) -> None:
    """Each optimizer step's log has every metric, averaged over the 2 sparse layers, and per layer."""
    assert [entry["step"] for entry in train_logs] == [1, 2, 3, 4]
    for entry in train_logs:
        for metric in ROUTER_METRICS:
            per_layer = [entry[f"router/layer_{layer}/{metric}"] for layer in (0, 1)]
            assert all(math.isfinite(value) for value in per_layer)
            assert entry[f"router/{metric}"] == pytest.approx(sum(per_layer) / 2, abs=1e-6)
        assert entry["router/dropped_fraction"] == 0.0  # the preset is dropless
        assert entry["router/entropy"] > 0 and entry["router/z_loss"] > 0 and entry["router/max_violation"] > 0


def test_reporting_callbacks_receive_router_metrics_averaged_and_per_layer(trainer_run):
    _, _, recorder, _ = trainer_run
    assert_router_metrics([entry for entry in recorder.reported_logs if "loss" in entry])


def test_trainer_log_history_holds_router_metrics_averaged_and_per_layer(trainer_run):
    trainer, _, _, _ = trainer_run
    assert_router_metrics([entry for entry in trainer.state.log_history if "loss" in entry])


def test_trainer_checkpoint_holds_the_selection_bias_of_its_step(trainer_run):
    _, _, recorder, output_dir = trainer_run
    for step in (2, 4):
        tensors = load_file(output_dir / f"checkpoint-{step}" / "model.safetensors")
        for key in BIAS_KEYS:
            assert torch.equal(tensors[key], recorder.after_step[step][key]), (step, key)
            assert tensors[key].dtype == torch.float32


def test_checkpoint_loads_with_its_selection_bias(trainer_run):
    _, _, _, output_dir = trainer_run
    checkpoint = output_dir / "checkpoint-2"
    tensors = load_file(checkpoint / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    for key in BIAS_KEYS:
        assert torch.equal(loaded.get_buffer(key), tensors[key]), key
        assert tensors[key].abs().max() > 0


def test_resume_from_checkpoint_restores_the_selection_bias(trainer_run, tmp_path):
    _, _, first_run, output_dir = trainer_run
    checkpoint = output_dir / "checkpoint-2"
    tensors = load_file(checkpoint / "model.safetensors")
    model = deepseek_v3_model()  # fresh: zero biases
    assert all(torch.all(bias == 0) for bias in biases(model).values())
    trainer = trainer_for(model, tmp_path)
    recorder = RecordBiases()
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    for key in BIAS_KEYS:
        assert torch.equal(recorder.at_begin[key], tensors[key]), key
    assert sorted(recorder.after_step) == [3, 4]
    for key in BIAS_KEYS:  # the resumed run continues exactly where the first one was
        assert torch.equal(recorder.after_step[4][key], first_run.after_step[4][key]), key
