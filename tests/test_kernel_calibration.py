""""auto" on a CPU runs the experts kernel timed fastest on this machine (hf_moe/modeling/kernel_choice.py).

The suite pins "auto" to `sorted_mm` (conftest.py); the tests here set HF_MOE_AUTO_KERNEL=calibrate and a cache folder
of their own. Which kernel wins is the machine's business: the tests force each outcome through a replaced timer
(`kernel_choice._time`), except one that times for real on tiny shapes, and check no timing threshold.
"""

import contextlib
import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_mixtral_config, random_input_ids, randomize_weights_
from peft import LoraConfig, get_peft_model
from test_experts_kernels import experts_module
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from hf_moe import MixtralMoEForCausalLM
from hf_moe.modeling import experts_kernels, kernel_choice
from hf_moe.modeling.modeling_hf_moe import MoEExperts

ATOL = 1e-5
KERNELS = list(experts_kernels.auto_kernels())


@pytest.fixture(autouse=True)
def calibrate(monkeypatch, tmp_path):
    """Timing on, a cache folder of the test's own, nothing decided in memory yet; kernel_choice logs at info."""
    monkeypatch.setenv(kernel_choice.PIN_ENV, kernel_choice.CALIBRATE)
    monkeypatch.setenv(kernel_choice.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(kernel_choice, "_decisions", {})
    monkeypatch.setattr(kernel_choice, "_unwritable", set())
    logging.getLogger(kernel_choice.__name__).setLevel(logging.INFO)


def clamped_experts(implementation: str = "auto") -> MoEExperts:
    """gpt-oss's gated unit, which `sorted_mm` does not take."""
    experts = experts_module(implementation)
    experts.experts_activation, experts.swiglu_alpha, experts.swiglu_limit = "clamped_swiglu", 1.702, 7.0
    return experts


def routed_inputs(tokens: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 32, generator=generator)
    index = torch.rand(tokens, 4, generator=generator).topk(2, dim=-1).indices
    weights = torch.rand(tokens, 2, generator=generator).softmax(dim=-1)
    return hidden, index, weights


def force(monkeypatch, winner: str) -> list[list[str]]:
    """Replace the timer: `winner` is fastest wherever it is a candidate. Returns the candidate lists timed."""
    timed = []

    def fake_time(experts, candidates, *args):
        timed.append(sorted(candidates))
        return {name: 1.0 if name == winner else 2.0 for name in candidates}

    monkeypatch.setattr(kernel_choice, "_time", fake_time)
    return timed


def no_timing(monkeypatch):
    def fail(*args):
        raise AssertionError("timed again")

    monkeypatch.setattr(kernel_choice, "_time", fail)


def run(experts, tokens: int, train: bool, seed: int = 1):
    """Output (and, training, the gradients of the inputs, routing weights and expert weights)."""
    hidden, index, weights = routed_inputs(tokens, seed)
    experts.zero_grad(set_to_none=True)
    if not train:
        with torch.no_grad():
            return [experts(hidden, index, weights)]
    hidden.requires_grad_()
    weights.requires_grad_()
    output = experts(hidden, index, weights)
    output.backward(torch.randn(output.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return [output, hidden.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad]


def stored_decisions() -> dict[str, dict]:
    return json.loads(kernel_choice.cache_path().read_text())["decisions"]


# ------------------------------------------------------------------------------------------------------------------
# What is chosen
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("winner", KERNELS)
@pytest.mark.parametrize(("tokens", "train"), [(1, False), (100, False), (100, True)])
def test_auto_matches_eager_whichever_kernel_wins(monkeypatch, winner, tokens, train):
    """Inference on one token (where `batched_mm` is a candidate too), on 100 and training on 100 (blocks longer than
    the 32 rows up to which `sorted_mm`'s oneDNN row counts are exact): whatever wins gives eager's outputs and
    gradients."""
    candidates = experts_kernels.auto_candidates(experts_module(), routed_inputs(tokens)[0], torch.zeros(tokens, 2),
                                                 "weights" if train else "none")
    if winner not in candidates:
        pytest.skip(f"{winner} is not a candidate here")
    timed = force(monkeypatch, winner)
    ours, reference = run(experts_module("auto"), tokens, train), run(experts_module("eager"), tokens, train)
    assert timed == [sorted(candidates)]
    assert list(kernel_choice.chosen_kernels().values()) == [winner]
    for mine, theirs in zip(ours, reference, strict=True):
        assert_close(mine, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_the_candidates_are_registered_kernels_that_take_the_module(dtype, train):
    """`sorted_mm` (twice in fp32 where oneDNN runs its products: through oneDNN and through `torch.mm`), transformers'
    `grouped_mm`, and its `batched_mm` for inference on a few tokens only; a layout `sorted_mm` refuses leaves
    transformers' kernels."""
    experts = experts_module().to(dtype)
    gradients = "weights" if train else "none"
    for tokens in (1, 2, 4, 5, 100):
        hidden = torch.randn(tokens, 32, dtype=dtype)
        candidates = experts_kernels.auto_candidates(experts, hidden, torch.zeros(tokens, 2), gradients)
        onednn = dtype == torch.float32 and experts_kernels._onednn_runs(hidden)
        expected = ["sorted_mm", *(["sorted_mm/torch.mm"] if onednn else []), "grouped_mm"]
        assert candidates == expected + (["batched_mm"] if not train and tokens <= 4 else [])
        for name in candidates:
            assert name.split("/")[0] in ALL_EXPERTS_FUNCTIONS
    assert experts_kernels.auto_candidates(clamped_experts(), torch.randn(100, 32), torch.zeros(100, 2), "none") == [
        "grouped_mm"]


def test_a_layout_sorted_mm_refuses_is_timed_among_transformers_kernels(monkeypatch):
    """gpt-oss's clamped SwiGLU: one token of inference times `grouped_mm` against `batched_mm`; 100 tokens have one
    candidate, run without timing."""
    timed = force(monkeypatch, "batched_mm")
    experts, reference = clamped_experts(), clamped_experts("eager")
    for tokens in (1, 100):
        assert_close(run(experts, tokens, train=False)[0], run(reference, tokens, train=False)[0], atol=ATOL, rtol=0)
    assert timed == [["batched_mm", "grouped_mm"]]


@pytest.mark.parametrize("pin", KERNELS)
def test_the_environment_pins_the_kernel(monkeypatch, pin):
    """HF_MOE_AUTO_KERNEL=<kernel> runs that kernel, untimed (`sorted_mm` falls back to `grouped_mm` for a layout it
    refuses), and it agrees with eager."""
    monkeypatch.setenv(kernel_choice.PIN_ENV, pin)
    no_timing(monkeypatch)
    calls, kernels = [], experts_kernels.auto_kernels()
    monkeypatch.setattr(experts_kernels, "auto_kernels", lambda: {
        name: (lambda *args, name=name, kernel=kernel: calls.append(name) or kernel(*args))
        for name, kernel in kernels.items()})
    for train in (False, True):
        ours, reference = run(experts_module("auto"), 10, train), run(experts_module("eager"), 10, train)
        for mine, theirs in zip(ours, reference, strict=True):
            assert_close(mine, theirs, atol=ATOL, rtol=0)
    run(clamped_experts(), 10, train=False)
    assert calls == [pin, pin, pin if pin in ("grouped_mm", "batched_mm") else "grouped_mm"]


@pytest.mark.parametrize("value", ["sorted", "eager", "auto", "grouped_mm "])
def test_a_pin_that_names_no_kernel_is_refused_with_the_allowed_values(monkeypatch, value):
    monkeypatch.setenv(kernel_choice.PIN_ENV, value)
    if value.strip() == "grouped_mm":  # surrounding blanks are forgiven
        experts_module()(*routed_inputs(3))
        return
    with pytest.raises(ValueError, match=r"HF_MOE_AUTO_KERNEL=.*allowed: calibrate, sorted_mm, sorted_mm/torch\.mm, "
                                         r"grouped_mm, batched_mm"):
        experts_module()(*routed_inputs(3))


def test_no_timing_for_gpus_meta_tensors_compiled_code_or_an_empty_batch(monkeypatch):
    """Those run `grouped_mm` as before (a GPU is faked by meta tensors: "auto" looks at the device type)."""
    no_timing(monkeypatch)
    calls = []
    monkeypatch.setattr(experts_kernels, "grouped_mm_experts_forward", lambda *args: calls.append(args[1].device.type))
    experts_module().to("meta")(*(tensor.to("meta") for tensor in routed_inputs(3)))
    experts_module()(*routed_inputs(0))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    experts_module()(*routed_inputs(3))
    assert calls == ["meta", "cpu", "cpu"]
    assert kernel_choice.chosen_kernels() == {}
    experts = experts_module()  # tensor subclasses (DTensors: their operations may wait for other ranks) are not timed
    assert kernel_choice.timeable(experts, torch.randn(3, 32))
    assert not kernel_choice.timeable(experts, torch.randn(3, 32).as_subclass(SubclassedTensor))
    experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().as_subclass(SubclassedTensor))
    assert not kernel_choice.timeable(experts, torch.randn(3, 32))


class SubclassedTensor(torch.Tensor):
    pass


class CountingMode(TorchDispatchMode):
    """A dispatch mode that sees every operation, as a FLOP counter does."""

    def __init__(self):
        super().__init__()
        self.operations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations += 1
        return func(*args, **(kwargs or {}))


def test_no_timing_inside_a_dispatch_mode(monkeypatch):
    """A dispatch mode would see the timing's operations as the model's: the call runs `grouped_mm`, undecided, and
    the mode sees the call's operations only (as many as under a pinned `grouped_mm`)."""
    no_timing(monkeypatch)
    experts, inputs = experts_module(), routed_inputs(3)
    with CountingMode() as mode:
        out = experts(*inputs)
    assert kernel_choice.chosen_kernels() == {}
    monkeypatch.setenv(kernel_choice.PIN_ENV, "grouped_mm")
    with CountingMode() as pinned:
        pinned_out = experts(*inputs)
    assert torch.equal(pinned_out, out) and mode.operations == pinned.operations > 0


# ------------------------------------------------------------------------------------------------------------------
# The real timing
# ------------------------------------------------------------------------------------------------------------------

def test_a_real_calibration_end_to_end(monkeypatch, caplog):
    """Times the candidates for real on tiny shapes: the winner is a candidate, logged once with the timings, stored
    with them, and used from memory, then (a new process) from the file, without timing again. Torch's random
    state is left as it was, and the real weights get no gradient from the timing."""
    experts = experts_module()
    state = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger=kernel_choice.__name__):
        first = run(experts, 20, train=True)
        assert torch.equal(torch.get_rng_state(), state)
        no_timing(monkeypatch)
        second = run(experts, 20, train=True)
    [(key, kernel)] = kernel_choice.chosen_kernels().items()
    assert kernel in experts_kernels.auto_candidates(experts, torch.randn(20, 32), torch.zeros(20, 2), "weights")
    [message] = [record.getMessage() for record in caplog.records if "experts kernel" in record.getMessage()]
    assert message.startswith(f'experts kernel "auto" runs {kernel} for {key} (measured: {kernel} ')
    entry = stored_decisions()[key]
    assert entry["kernel"] == kernel and entry["timed_tokens"] == 32
    assert set(entry["ms"]) == set(key.split("candidates=")[1].split(",")) and min(entry["ms"].values()) > 0
    for a, b in zip(first, second, strict=True):  # the gradients are the step's own: none left by the timing
        assert torch.equal(a, b)
    monkeypatch.setattr(kernel_choice, "_decisions", {})  # as a new process
    run(experts, 20, train=True)
    assert kernel_choice.chosen_kernels() == {key: kernel}


class ScriptedClock:
    """Stands in for `time` in kernel_choice: each scripted kernel call advances the clock by its next duration."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def strftime(self, *args) -> str:
        return "2026-01-01T00:00:00"

    def kernel(self, durations_ms: list[float], calls: list[str], name: str):
        durations = iter(durations_ms)

        def forward(experts, hidden, index, weights):
            calls.append(name)
            self.now += next(durations) / 1000
            return hidden.new_zeros(hidden.shape)

        return forward


@pytest.mark.parametrize("call_ms", [1.0, 500.0])  # rounds well within the time budget, and far beyond it
def test_each_candidate_keeps_its_fastest_of_at_least_five_timed_calls(monkeypatch, call_ms):
    """Noise on a shared machine only adds time: a kernel that is fastest in two of five calls wins over a steady one
    that a median would have chosen; slow calls are timed five times too (after one warm-up call each)."""
    clock, calls = ScriptedClock(), []
    monkeypatch.setattr(kernel_choice, "time", clock)
    spiky = [call_ms] + [call_ms, 4 * call_ms, 4 * call_ms, call_ms, 4 * call_ms] * 2  # warm-up, then the rounds
    candidates = {"steady": clock.kernel([2 * call_ms] * 11, calls, "steady"),
                  "spiky": clock.kernel(spiky, calls, "spiky")}
    timings = kernel_choice._time(experts_module(), candidates, torch.float32, 32, 2, "none", 4)
    assert timings == pytest.approx({"steady": 2 * call_ms, "spiky": call_ms})
    timed_calls = calls.count("spiky") - 1
    assert calls.count("steady") - 1 == timed_calls and timed_calls >= kernel_choice._MIN_ROUNDS == 5
    assert timed_calls == (5 if call_ms == 500.0 else kernel_choice._MAX_ROUNDS)


def test_the_timing_runs_in_the_callers_thread(monkeypatch):
    """Where the real calls run: the OpenMP team of the parallel regions belongs to the calling thread, and timed from
    a thread of its own `sorted_mm` (oneDNN) ran slower than the caller runs it (kernel_choice's docstring)."""
    threads = []
    timed = kernel_choice._time
    monkeypatch.setattr(kernel_choice, "_time", lambda *args: threads.append(threading.get_ident()) or timed(*args))
    run(experts_module(), 20, train=True)
    run(experts_module(), 3, train=False)
    assert threads == [threading.get_ident()] * 2


def test_seeded_runs_stay_reproducible_across_a_calibration():
    """Calibrating draws nothing from torch's global generator: a seeded sequence of draws and forwards gives the same
    numbers whether or not the first forward timed the kernels."""
    experts = experts_module()

    def seeded_draws() -> list[torch.Tensor]:
        torch.manual_seed(3)
        before = torch.randn(4)
        out = experts(*routed_inputs(8))
        return [before, torch.randn(4), out]

    first = seeded_draws()
    assert list(kernel_choice.chosen_kernels()) == list(stored_decisions())  # it timed
    second = seeded_draws()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)



def test_timing_stays_out_of_the_callers_autograd(monkeypatch):
    """The timing saves no tensor through the caller's saved-tensor hooks (a call that times saves as many as one
    that does not), so that it runs inside a non-reentrant activation checkpoint (whose hooks would refuse the
    recomputation); the weights it uses are the module's, without a gradient or a hook reaching them."""
    def saved_by(call) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(1) or tensor, lambda tensor: tensor):
            call()
        return len(saved)

    experts, reference = experts_module(), experts_module("eager")
    hidden, index, weights = routed_inputs(40)
    hidden.requires_grad_()
    timing = saved_by(lambda: experts(hidden, index, weights))
    assert list(kernel_choice.chosen_kernels()) == list(stored_decisions())  # timed
    assert timing == saved_by(lambda: experts(hidden, index, weights)) > 0

    monkeypatch.setattr(kernel_choice, "_decisions", {})  # time again, inside a checkpoint
    hooked = []
    experts.gate_up_proj.register_hook(lambda grad: hooked.append(grad.shape))
    output = checkpoint(experts, hidden, index, weights, use_reentrant=False)
    assert kernel_choice.chosen_kernels()
    assert hooked == [] and experts.gate_up_proj.grad is None
    output.sum().backward()
    assert hooked == [experts.gate_up_proj.shape]
    hidden_reference = hidden.detach().requires_grad_()
    reference(hidden_reference, index, weights).sum().backward()
    assert_close(hidden.grad, hidden_reference.grad, atol=ATOL, rtol=0)
    assert_close(experts.gate_up_proj.grad, reference.gate_up_proj.grad, atol=ATOL, rtol=0)


class LowRankDelta(torch.nn.Module):
    """A LoRA-like parametrization of `gate_up_proj` [E, 2I, H]: the weight plus a trainable rank-2 product."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.a = torch.nn.Parameter(0.1 * torch.randn(4, 128, 2, generator=generator))
        self.b = torch.nn.Parameter(0.1 * torch.randn(4, 2, 32, generator=generator))

    def forward(self, weight):
        return weight + self.a @ self.b


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "parametrize.cached"])
def test_parametrized_weights_are_timed_without_computing_through_their_parameters(cached):
    """Experts whose weights are parametrized (LoRA on the fused weights, as peft's `target_parameters` does) are
    timed on the adapted weights, frozen: the adapter's parameters get their gradients from the real call only. peft
    runs the adapted module inside `parametrize.cached()`: the timing must not leave its frozen value in that cache."""
    experts, reference = experts_module(), experts_module("eager")
    for module in (experts, reference):
        module.gate_up_proj.requires_grad_(False)
        torch.nn.utils.parametrize.register_parametrization(module, "gate_up_proj", LowRankDelta())
    hidden, index, weights = routed_inputs(40)
    with torch.nn.utils.parametrize.cached() if cached else contextlib.nullcontext():
        output = experts(hidden, index, weights)
    [key] = kernel_choice.chosen_kernels()
    assert "gradients=weights" in key and "intermediate=64" in key
    assert key in stored_decisions()  # timed (a failed timing would fall back to grouped_mm, unstored)
    assert all(parameter.grad is None for parameter in experts.parameters())
    output.backward(torch.ones_like(output))
    reference(hidden, index, weights).backward(torch.ones_like(output))
    for name in ("a", "b"):
        assert_close(getattr(experts.parametrizations.gate_up_proj[0], name).grad,
                     getattr(reference.parametrizations.gate_up_proj[0], name).grad, atol=ATOL, rtol=0)


def test_peft_lora_on_the_experts_trains_through_the_timed_first_call_under_activation_checkpointing(monkeypatch):
    """peft's `target_parameters` LoRA on a whole model's fused experts, activation checkpointing on: the first
    training call of each shape times the kernels inside the checkpointed layer. The recomputation in the backward,
    which does not time, must save the same tensors, and the LoRA factors get the gradients of the same step with the
    chosen kernel pinned (no timing)."""
    input_ids = random_input_ids(2, 8)
    gradients, chosen = {}, None
    for pin in (kernel_choice.CALIBRATE, "chosen"):
        if pin == "chosen":
            monkeypatch.setenv(kernel_choice.PIN_ENV, chosen)
        torch.manual_seed(0)
        model = randomize_weights_(MixtralMoEForCausalLM(make_mixtral_config())).train()
        model.activation_checkpointing_enable()
        experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        model = get_peft_model(model, LoraConfig(r=2, lora_dropout=0.0, target_parameters=experts))
        torch.manual_seed(3)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                torch.nn.init.normal_(parameter, std=0.1)
        model(input_ids, labels=input_ids).loss.backward()
        gradients[pin] = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        if pin == kernel_choice.CALIBRATE:  # timed once: both layers have the same shapes
            [(key, chosen)] = kernel_choice.chosen_kernels().items()
            assert "gradients=weights" in key  # the adapted weights train: timed with their gradients
    assert len(gradients["chosen"]) == 8  # A and B of two weights in two layers
    for name, grad in gradients["chosen"].items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_close(gradients[kernel_choice.CALIBRATE][name], grad, atol=ATOL, rtol=0, msg=name)


def test_a_timing_that_fails_falls_back_to_grouped_mm_with_a_warning(monkeypatch, caplog):
    """Not retried at each call, not stored (the next process times again)."""
    attempts = []

    def broken(*args):
        attempts.append(1)
        raise RuntimeError("no such primitive")

    monkeypatch.setattr(kernel_choice, "_time", broken)
    with caplog.at_level(logging.WARNING, logger=kernel_choice.__name__):
        out = run(experts_module(), 20, train=False)[0]
        run(experts_module(), 20, train=False)
    assert_close(out, run(experts_module("eager"), 20, train=False)[0], atol=ATOL, rtol=0)
    assert attempts == [1] and list(kernel_choice.chosen_kernels().values()) == ["grouped_mm"]
    assert "could not time" in caplog.text and "no such primitive" in caplog.text
    assert not kernel_choice.cache_path().exists()


def test_the_timing_runs_under_the_callers_cpu_autocast(monkeypatch):
    seen = []

    def fake_time(experts, candidates, *args):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return {name: float(rank) for rank, name in enumerate(candidates)}

    monkeypatch.setattr(kernel_choice, "_time", fake_time)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        experts_module()(*routed_inputs(20))
    experts_module()(*routed_inputs(20))
    assert seen == [torch.bfloat16, None]
    assert {dict(part.split("=", 1) for part in key.split("; "))["dtype"] for key in stored_decisions()} == {
        "float32", "float32 autocast bfloat16"}


def test_gradients_needed_tells_inference_frozen_experts_and_training_apart():
    experts = experts_module()
    hidden, _, weights = routed_inputs(3)
    assert kernel_choice.gradients_needed(experts, hidden, weights) == "weights"
    with torch.no_grad():
        assert kernel_choice.gradients_needed(experts, hidden, weights) == "none"
    experts.requires_grad_(False)
    assert kernel_choice.gradients_needed(experts, hidden, weights) == "none"
    assert kernel_choice.gradients_needed(experts, hidden.requires_grad_(), weights) == "inputs"


class FactorsHeldAsTensors(torch.nn.Module):
    """W + A @ B with the factors as plain tensor attributes, not parameters, as peft's LoRA proxy holds them."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, weight):
        return weight + self.a @ self.b


def test_gradients_needed_sees_trainable_factors_that_a_parametrization_holds_as_tensors():
    hidden, _, weights = routed_inputs(3)
    a, b = torch.zeros(4, 128, 2, requires_grad=True), torch.zeros(4, 2, 32)
    for factors, expected in (((a, b * 2), "weights"), ((a.detach(), b), "none")):  # b * 2 requires grad
        experts = experts_module().requires_grad_(False)
        torch.nn.utils.parametrize.register_parametrization(experts, "gate_up_proj", FactorsHeldAsTensors(*factors))
        assert kernel_choice.gradients_needed(experts, hidden, weights) == expected


# ------------------------------------------------------------------------------------------------------------------
# The key and the cache file
# ------------------------------------------------------------------------------------------------------------------

def test_token_buckets_are_powers_of_two_up_to_the_cap():
    assert [kernel_choice.token_bucket(tokens) for tokens in (0, 1, 2, 3, 5, 16, 17)] == [1, 1, 2, 4, 8, 16, 32]
    assert kernel_choice.token_bucket(10_000) == kernel_choice.MAX_TIMED_TOKENS


def test_decisions_are_kept_per_key_in_the_file(monkeypatch):
    """One entry per (CPU, torch, threads, dtype, shapes, top-k, gradients, token bucket, candidates); calls that share
    them share the entry."""
    timed = force(monkeypatch, "grouped_mm")
    experts = experts_module()
    for tokens in (20, 30, 32):  # one bucket
        run(experts, tokens, train=True)
    run(experts, 20, train=False)  # inference
    run(experts, 200, train=True)  # another bucket
    run(experts, 2000, train=True)  # over the cap: the capped bucket
    with torch.no_grad():
        experts.to(torch.bfloat16)(*(tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
                                     for tensor in routed_inputs(20)))
    experts_module(intermediate_size=48)(*routed_inputs(20))
    assert len(timed) == 5
    keys = list(stored_decisions())
    assert len(keys) == 5
    fields = dict(part.split("=", 1) for part in keys[0].split("; "))
    assert set(fields) == {"cpu", "torch", "threads", "dtype", "hidden", "intermediate", "experts", "top_k",
                           "gradients", "tokens", "candidates"}
    assert fields["cpu"] == kernel_choice.cpu_name() and fields["torch"] == torch.__version__
    assert fields["threads"] == str(torch.get_num_threads())
    values = {key: dict(part.split("=", 1) for part in key.split("; ")) for key in keys}
    assert {(v["dtype"], v["intermediate"], v["gradients"], v["tokens"]) for v in values.values()} == {
        ("float32", "64", "weights", "32"), ("float32", "64", "none", "32"), ("float32", "64", "weights", "256"),
        ("bfloat16", "64", "none", "32"), ("float32", "48", "weights", "32")}
    assert all(v["hidden"] == "32" and v["experts"] == "4" and v["top_k"] == "2" for v in values.values())


def test_the_file_round_trips_between_processes_and_merges_their_entries(monkeypatch):
    force(monkeypatch, "sorted_mm/torch.mm" if experts_kernels._onednn_linear is not None else "sorted_mm")
    run(experts_module(), 20, train=True)
    [(key, kernel)] = kernel_choice.chosen_kernels().items()
    path = kernel_choice.cache_path()
    other = {"kernel": "grouped_mm", "ms": {"grouped_mm": 1.0}}  # another process's entry, written meanwhile
    path.write_text(json.dumps({"format": kernel_choice._FORMAT, "decisions": {**stored_decisions(), "other key": other}}))
    run(experts_module(), 20, train=False)
    assert stored_decisions()["other key"] == other and stored_decisions()[key]["kernel"] == kernel
    monkeypatch.setattr(kernel_choice, "_decisions", {})  # a new process reads both
    no_timing(monkeypatch)
    run(experts_module(), 20, train=True)
    run(experts_module(), 20, train=False)
    assert kernel_choice.chosen_kernels()[key] == kernel


@pytest.mark.parametrize("old_format", [1, 2, 3])
def test_a_file_of_another_format_is_timed_again_and_rewritten(monkeypatch, caplog, old_format):
    """Format 1 was timed in a thread of its own, which favoured the wrong kernel, format 2 kept the median of as few
    as two calls, format 3 timed `sorted_mm/torch.mm` before it paired the experts of one-token calls: their
    decisions are not used."""
    force(monkeypatch, "grouped_mm")
    run(experts_module(), 20, train=True)
    [key] = stored_decisions()
    path = kernel_choice.cache_path()
    path.write_text(json.dumps({"format": old_format, "decisions": {key: {"kernel": "sorted_mm", "ms": {}}}}))
    monkeypatch.setattr(kernel_choice, "_decisions", {})  # a new process
    timed = force(monkeypatch, "grouped_mm")
    with caplog.at_level(logging.INFO, logger=kernel_choice.__name__):
        run(experts_module(), 20, train=True)
    assert len(timed) == 1 and "timed by another version" in caplog.text
    assert json.loads(path.read_text())["format"] == kernel_choice._FORMAT
    assert stored_decisions()[key]["kernel"] == "grouped_mm"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"decisions": {"k": {"ms": 1}}}', b"\xff\xfe"])
def test_a_corrupt_file_is_ignored_with_a_warning_and_rewritten(monkeypatch, caplog, content):
    path = kernel_choice.cache_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    timed = force(monkeypatch, "grouped_mm")
    with caplog.at_level(logging.WARNING, logger=kernel_choice.__name__):
        run(experts_module(), 20, train=True)
    assert len(timed) == 1
    assert any("timing the kernels again" in record.getMessage() for record in caplog.records)
    assert [entry["kernel"] for entry in stored_decisions().values()] == ["grouped_mm"]


def test_the_file_is_replaced_whole_through_a_temporary_file(monkeypatch):
    """Written next to the file and renamed over it: a failure while writing leaves the old file as it was and no
    temporary file behind, and the forward goes on."""
    force(monkeypatch, "grouped_mm")
    replaced = []
    replace = os.replace
    monkeypatch.setattr(kernel_choice.os, "replace", lambda src, dst: replaced.append((src, dst)) or replace(src, dst))
    run(experts_module(), 20, train=True)
    [(temporary, path)] = replaced
    assert Path(temporary).parent == Path(path).parent and temporary != path
    before = Path(path).read_bytes()

    def broken_dump(data, file, **kwargs):
        file.write('{"decisions": {')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kernel_choice.json, "dump", broken_dump)
    run(experts_module(), 20, train=False)
    assert Path(path).read_bytes() == before
    assert sorted(item.name for item in Path(path).parent.iterdir()) == [kernel_choice.CACHE_FILE]


def test_a_folder_that_cannot_be_written_keeps_the_decisions_in_memory(monkeypatch, caplog, tmp_path):
    """(A folder under a file: permission bits do not stop root, which may run the suite.)"""
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv(kernel_choice.CACHE_ENV, str(tmp_path / "a file" / "cache"))
    timed = force(monkeypatch, "grouped_mm")
    with caplog.at_level(logging.WARNING, logger=kernel_choice.__name__):
        out = run(experts_module(), 20, train=True)
        run(experts_module(), 20, train=True)
        run(experts_module(), 20, train=False)
    assert len(timed) == 2  # training and inference, each once
    assert all(tensor is not None for tensor in out)
    assert len([record for record in caplog.records if "cannot write" in record.getMessage()]) == 1


def test_the_cache_folder_defaults_to_hf_home(monkeypatch, tmp_path):
    monkeypatch.delenv(kernel_choice.CACHE_ENV)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert kernel_choice.cache_path() == tmp_path / "hf_home" / "hf_moe" / "experts_kernels.json"
