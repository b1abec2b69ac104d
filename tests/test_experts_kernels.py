"""The `sorted_mm` experts implementation: registered with transformers, exact against eager.

Its products run as one matrix product per expert (CPUs: oneDNN's in fp32 on x86-64, else `torch.mm`) or as one
grouped kernel per product (CUDA GPUs): the `products` fixture runs a test under all three, the grouped one through
torch's CPU `grouped_mm` kernel, which takes the same arguments as the CUDA one. The `cuda` tests run the real GPU
path where a GPU is present.
"""

import pytest
import torch
from conftest import make_mixtral_config, random_input_ids, randomize_weights_
from torch.testing import assert_close
from transformers import MixtralConfig, MixtralForCausalLM

from hf_moe import MixtralMoEForCausalLM
from hf_moe.modeling import experts_kernels
from hf_moe.modeling.modeling_hf_moe import MoEExperts

ON_X86_WITH_ONEDNN = experts_kernels._onednn_linear is not None  # None off x86-64 or without oneDNN


@pytest.fixture(params=["loop", "loop torch.mm", "grouped"])
def products(request, monkeypatch):
    """Which products `sorted_mm` runs: the per-expert loop (the CPU default; its fp32 products through oneDNN on
    x86-64), the loop through `torch.mm` (oneDNN switched off), or the grouped kernel (CUDA's)."""
    if request.param == "loop torch.mm":
        with torch.backends.mkldnn.flags(enabled=False):
            yield request.param
        return
    if request.param == "grouped":
        if experts_kernels._grouped_mm is None:
            pytest.skip("this torch has no grouped_mm")
        monkeypatch.setattr(experts_kernels, "_grouped_kernel_applies", lambda hidden_states, weight: True)
    yield request.param


def experts_module(implementation: str = "auto", **overrides) -> MoEExperts:
    """Mixtral-like fused experts (make_mixtral_config with `overrides`) under `implementation`, seeded weights."""
    config = make_mixtral_config(**overrides)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    experts = MoEExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    return experts


def _check_ids_of_other_ranks_are_skipped(sorted_mm: MoEExperts, grad_enabled: bool):
    eager = experts_module("eager")
    hidden = torch.randn(6, 32)
    index = torch.tensor([[0, 4], [1, 2], [4, 4], [3, 0], [2, 4], [1, 3]])  # 4 == num_experts: not on this rank
    weights = torch.rand(6, 2) * (index < 4)
    with torch.set_grad_enabled(grad_enabled):
        output = sorted_mm(hidden, index, weights)
    assert output.requires_grad == grad_enabled
    assert_close(output, eager(hidden, index, weights), atol=1e-6, rtol=0)
    assert torch.equal(output[2], torch.zeros(32))


@pytest.mark.parametrize("grad_enabled", [True, False])  # the autograd function, and the inference path
def test_expert_ids_of_other_ranks_are_skipped(grad_enabled, products):
    """Under expert parallelism, ids >= num_experts mark tokens owned by another rank (with zero weight); the module's
    flag, set by transformers' expert-parallel plan, says so (the grouped path relies on it, as transformers'
    `grouped_mm` does)."""
    sorted_mm = experts_module("sorted_mm")
    sorted_mm._is_expert_parallel = True
    _check_ids_of_other_ranks_are_skipped(sorted_mm, grad_enabled)


def test_the_loop_skips_ids_of_other_ranks_without_the_flag_too():
    """As eager does."""
    _check_ids_of_other_ranks_are_skipped(experts_module("sorted_mm"), grad_enabled=True)


@pytest.mark.parametrize("hidden_act", ["silu", "gelu"])
@pytest.mark.parametrize("experts_used", [4, 2])
def test_gradients_of_inputs_weights_and_routing_match_eager(hidden_act, experts_used, products):
    """SiLU takes a fused backward, other activations autograd's. With 2 of 4 experts routed to, the gradient
    blocks of the other two (left uninitialised, then zeroed) must be exactly zero."""
    outputs = {}
    for implementation in ("eager", "sorted_mm"):
        experts = experts_module(implementation, hidden_act=hidden_act)
        hidden = torch.randn(10, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
        index = torch.randint(0, experts_used, (10, 2), generator=torch.Generator().manual_seed(2))
        index = index * (4 // experts_used)
        weights = torch.rand(10, 2, generator=torch.Generator().manual_seed(3)).requires_grad_()
        torch.full((64, 1024), float("nan"))  # leave NaNs behind in freed memory for uninitialised buffers
        out = experts(hidden, index, weights)
        out.backward(torch.randn_like(out, memory_format=torch.contiguous_format))
        outputs[implementation] = (out, hidden.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    for ours, reference in zip(outputs["sorted_mm"], outputs["eager"]):
        assert_close(ours, reference, atol=1e-5, rtol=0)
    unused = [expert for expert in range(4) if expert % (4 // experts_used)]
    for gradient in outputs["sorted_mm"][3:]:
        assert torch.equal(gradient[unused], torch.zeros_like(gradient[unused]))


@pytest.mark.parametrize("grad_enabled", [False, True])
@pytest.mark.parametrize("index", [[[2, 0]], [[3, 0, 2]], [[1, 3, 0, 2]], [[3, 1], [0, 2]], [[1, 3], [3, 0]]],
                         ids=["1 token, 2 experts", "1 token, 3", "1 token, 4", "2 tokens, 4 experts", "2 tokens, 3"])
def test_one_row_per_expert_runs_the_experts_in_pairs_and_matches_eager(monkeypatch, index, grad_enabled):
    """On `torch.mm` (oneDNN off), where every expert got one row (decoding one token) the forward's products run
    the experts two at a time as one batched product over a strided view of the weights (`_pairs_times`; an odd
    expert alone). The backward's products, whose weights are read across their rows, keep the loop."""
    pairs = []
    pairs_times = experts_kernels._LoopProducts._pairs_times
    monkeypatch.setattr(experts_kernels._LoopProducts, "_pairs_times",
                        lambda self, *args: pairs.append(len(self.blocks)) or pairs_times(self, *args))
    index = torch.tensor(index)
    hidden = torch.randn(len(index), 32, generator=torch.Generator().manual_seed(1))
    weights = torch.rand(index.shape, generator=torch.Generator().manual_seed(3))
    outputs = {}
    for implementation in ("eager", "sorted_mm"):
        experts = experts_module(implementation, num_experts_per_tok=index.shape[1])
        inputs = (hidden.clone().requires_grad_(grad_enabled), index, weights.clone().requires_grad_(grad_enabled))
        with torch.backends.mkldnn.flags(enabled=False), torch.set_grad_enabled(grad_enabled):
            out = experts(*inputs)
            if grad_enabled:
                out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)))
        outputs[implementation] = (out, *(inputs[0].grad, inputs[2].grad, experts.gate_up_proj.grad,
                                          experts.down_proj.grad)[: 4 if grad_enabled else 0])
    for ours, reference in zip(outputs["sorted_mm"], outputs["eager"], strict=True):
        assert_close(ours, reference, atol=1e-5, rtol=0)
    one_row_each = len(set(index.flatten().tolist())) == index.numel()
    assert pairs == ([index.numel()] * 2 if one_row_each else [])  # gate/up and down, once each


def test_no_tokens(products):
    """An empty batch (or a rank that got no tokens) gives an empty output and zero weight gradients."""
    experts = experts_module("sorted_mm")
    hidden = torch.randn(0, 32, requires_grad=True)
    output = experts(hidden, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    output.sum().backward()
    assert output.shape == (0, 32)
    assert torch.equal(experts.gate_up_proj.grad, torch.zeros_like(experts.gate_up_proj))


def test_the_loop_runs_on_cpu_and_the_grouped_kernel_needs_cuda():
    experts = experts_module("sorted_mm")
    assert not experts_kernels._grouped_kernel_applies(torch.randn(3, 32), experts.gate_up_proj)


@pytest.mark.skipif(not ON_X86_WITH_ONEDNN, reason="oneDNN's linear runs the fp32 products on x86-64 CPUs only")
@pytest.mark.parametrize(("dtype", "enabled", "rows", "products_through_onednn"),
                         [(torch.float32, True, 20, 12), (torch.float32, True, 6, 8), (torch.float32, False, 20, 0),
                          (torch.bfloat16, True, 20, 0)])
def test_fp32_products_go_through_onednn(monkeypatch, dtype, enabled, rows, products_through_onednn):
    """In fp32 the six products of each expert with pairs (gate/up and down forward; their input gradients and
    weight gradients backward) run through oneDNN, unless switched off; in bf16 `torch.mm` already does. A weight
    gradient summed over at most 16 rows stays on `torch.mm` (oneDNN's result would have to be copied in). The
    agreement tests above check the results under each path."""
    calls = []
    linear = experts_kernels._onednn_linear
    monkeypatch.setattr(experts_kernels, "_onednn_linear", lambda *args: calls.append(1) or linear(*args))
    experts = experts_module("sorted_mm").to(dtype)
    hidden = torch.randn(rows, 32, dtype=dtype, requires_grad=True)
    index = torch.tensor([[0, 1], [1, 0]] * (rows // 2))  # 2 experts with `rows` pairs each
    with torch.backends.mkldnn.flags(enabled=enabled):
        experts(hidden, index, torch.rand(rows, 2, dtype=dtype)).sum().backward()
    assert len(calls) == products_through_onednn


def test_bucketed_row_counts_are_few_and_waste_at_most_a_sixteenth():
    """oneDNN compiles a kernel per product shape: the row counts it sees are bucketed, exact up to 32."""
    buckets = [experts_kernels._bucketed(rows) for rows in range(1, 8193)]
    assert buckets[:32] == list(range(1, 33))
    assert all(rows <= bucket <= rows * 17 / 16 for rows, bucket in enumerate(buckets, start=1))
    assert len(set(buckets)) == 32 + 16 * 8  # 16 per power of two from 32 to 8192


@pytest.mark.skipif(not ON_X86_WITH_ONEDNN, reason="oneDNN's linear runs the fp32 products on x86-64 CPUs only")
def test_onednn_products_run_on_windows_from_each_block(monkeypatch):
    """Each expert's oneDNN product runs on a window of a bucketed number of rows from its block's first row: into the
    next block's rows, or zero padding at the end of the rows. Only the block's own results are kept, even where the
    next block's rows are NaN, and they do not depend on what follows the block."""
    sizes = [45, 0, 3, 70, 33]  # rows per expert -> windows of 46, 3, 72 and 34 rows
    products = experts_kernels._LoopProducts(torch.tensor(sizes).cumsum(0).to(torch.int32))
    rows = torch.randn(sum(sizes), 16, generator=torch.Generator().manual_seed(0))
    rows[45:48] = float("nan")  # expert 2's rows, inside expert 0's window
    weight = torch.randn(5, 16, 8, generator=torch.Generator().manual_seed(1))
    windows = []
    linear = experts_kernels._onednn_linear
    monkeypatch.setattr(experts_kernels, "_onednn_linear", lambda x, *args: windows.append(len(x)) or linear(x, *args))
    out = products.rows_times(rows, weight)
    assert windows == [46, 3, 72, 34]
    starts = [0, 45, 45, 48, 118, 151]
    for expert in range(5):
        block = slice(starts[expert], starts[expert + 1])
        assert_close(out[block], rows[block] @ weight[expert], atol=1e-5, rtol=0, equal_nan=expert == 2)
    assert not out[:45].isnan().any() and not out[48:].isnan().any()
    # without expert 4, expert 3's block is the last one, its window padded: the same results to the bit
    last = experts_kernels._LoopProducts(torch.tensor(sizes[:4]).cumsum(0).to(torch.int32))
    assert torch.equal(last.rows_times(rows[:118], weight[:4])[48:118], out[48:118])


@pytest.mark.skipif(not ON_X86_WITH_ONEDNN, reason="oneDNN's linear runs the fp32 products on x86-64 CPUs only")
def test_onednn_weight_gradients_sum_over_each_block_padded_with_zero_rows(monkeypatch):
    """A weight gradient's oneDNN product per expert sums over the block's rows, padded with zero rows up to the
    bucketed count: never over the next block's rows (NaN here), and to the same sums as the exact products. A block
    of at most 16 rows takes `torch.mm`."""
    sizes = [45, 0, 3, 70, 33]  # rows per expert -> oneDNN sums over 46, 72 and 34 rows; torch.mm over 3
    products = experts_kernels._LoopProducts(torch.tensor(sizes).cumsum(0).to(torch.int32))
    left = torch.randn(sum(sizes), 16, generator=torch.Generator().manual_seed(0))
    right = torch.randn(sum(sizes), 8, generator=torch.Generator().manual_seed(1))
    left[45:48] = float("nan")  # expert 2's rows, right after expert 0's block
    sums = []
    linear = experts_kernels._onednn_linear
    monkeypatch.setattr(experts_kernels, "_onednn_linear", lambda x, *args: sums.append(x.shape[1]) or linear(x, *args))
    torch.full((5, 16, 8), float("nan"))  # leave NaNs behind in freed memory for the uninitialised gradient
    out = products.outer(left, right)
    assert sums == [46, 72, 34]
    starts = [0, 45, 45, 48, 118, 151]
    for expert in range(5):
        block = slice(starts[expert], starts[expert + 1])
        assert_close(out[expert], left[block].t() @ right[block], atol=1e-5, rtol=0, equal_nan=expert == 2)
    assert not out[[0, 1, 3, 4]].isnan().any()
    assert torch.equal(out[1], torch.zeros(16, 8))


@pytest.mark.skipif(not ON_X86_WITH_ONEDNN, reason="oneDNN's linear runs the fp32 products on x86-64 CPUs only")
def test_the_torch_mm_variant_keeps_every_product_on_torch_mm(monkeypatch):
    """"auto"'s candidate `sorted_mm/torch.mm`: the same kernel with its fp32 products on `torch.mm` (MKL), the
    other matrix library, faster on some CPUs (test_kernel_calibration.py checks it against eager)."""
    calls = []
    monkeypatch.setattr(experts_kernels, "_onednn_linear", lambda *args: calls.append(1))
    experts = experts_module("sorted_mm")
    hidden = torch.randn(40, 32, requires_grad=True)
    index = torch.tensor([[0, 1], [1, 0]] * 20)
    experts_kernels.sorted_mm_torch_mm_experts_forward(experts, hidden, index, torch.rand(40, 2)).sum().backward()
    assert calls == [] and hidden.grad is not None


def test_auto_matches_eager_in_outputs_and_gradients():
    """What "auto" runs under the suite's pin (`sorted_mm`, through oneDNN on x86-64 in fp32, inference and
    training; test_kernel_calibration.py forces each other candidate) gives eager's outputs and gradients, with expert
    blocks longer than the 32 rows up to which oneDNN's row counts are exact (the windows of the row products, the
    zero padding of the weight gradients' sums)."""
    results = {}
    for implementation in ("auto", "eager"):
        hidden = torch.randn(100, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
        index = torch.randint(0, 4, (100, 2), generator=torch.Generator().manual_seed(2))
        weights = torch.rand(100, 2, generator=torch.Generator().manual_seed(3)).requires_grad_()
        experts = experts_module(implementation)
        with torch.no_grad():
            inference = experts(hidden, index, weights)
        output = experts(hidden, index, weights)
        output.backward(torch.randn(100, 32, generator=torch.Generator().manual_seed(4)))
        results[implementation] = (inference, output, hidden.grad, weights.grad, experts.gate_up_proj.grad,
                                   experts.down_proj.grad)
    assert torch.bincount(index.flatten()).min() > 32
    (inference, *trained), (eager_inference, *eager_trained) = results["auto"], results["eager"]
    assert_close(inference, eager_inference, atol=1e-6, rtol=0)
    for ours, reference in zip(trained, eager_trained):
        assert_close(ours, reference, atol=1e-5, rtol=0)


def test_gpu_tensors_never_take_the_onednn_products():
    """oneDNN's linear runs on CPU tensors only; on a GPU "auto" runs `grouped_mm` (the device check, on a meta
    tensor here since the suite runs without a GPU)."""
    assert not experts_kernels._onednn_runs(torch.empty(2, 32, device="meta"))


def test_interleaved_gate_up_weights_are_refused():
    """[gate0, up0, gate1, up1, ...] layouts (transformers' is_concatenated=False) would be split wrongly."""
    experts = experts_module("sorted_mm")
    experts.is_concatenated = False
    with pytest.raises(ValueError, match="gate; up"):
        experts(torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


@pytest.mark.parametrize("implementation", ["sorted_mm", "auto"])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_generate_decodes_with_batched_mm_on_a_gpu_as_for_grouped_mm(monkeypatch, device_type, implementation):
    """On a GPU, transformers' generate() runs `batched_mm` for the decoding steps of a model set to `grouped_mm`;
    our models hand `sorted_mm` and "auto" over the same way and restore them afterwards. The swap looks only at
    `model.device`, faked here; transformers' own context manager does the second half of the swap."""
    model = MixtralMoEForCausalLM(make_mixtral_config()).eval()
    model.set_experts_implementation(implementation)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device(device_type)))
    with model._optimize_model_for_decode():
        assert model.config._experts_implementation == ("batched_mm" if device_type == "cuda" else implementation)
    assert model.config._experts_implementation == implementation


def test_generate_enters_the_decode_hook(monkeypatch):
    """The swap above only matters while generate() calls `_optimize_model_for_decode`: fail if it stops."""
    model = MixtralMoEForCausalLM(make_mixtral_config()).eval()
    calls, hook = [], type(model)._optimize_model_for_decode
    monkeypatch.setattr(type(model), "_optimize_model_for_decode", lambda self: calls.append(1) or hook(self))
    model.generate(random_input_ids(1, 4), max_new_tokens=2, do_sample=False)
    assert calls


def test_transformers_own_mixtral_can_select_it():
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    torch.manual_seed(0)
    model = randomize_weights_(MixtralForCausalLM(config))
    input_ids = random_input_ids(2, 7)
    results = {}
    for implementation in ("grouped_mm", "sorted_mm"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        results[implementation] = (out.logits.detach(), [p.grad.clone() for p in model.parameters()])
    assert model.config._experts_implementation == "sorted_mm"
    assert_close(results["sorted_mm"][0], results["grouped_mm"][0], atol=1e-5, rtol=0)
    for ours, reference in zip(results["sorted_mm"][1], results["grouped_mm"][1]):
        assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_grouped_kernel_matches_eager(dtype):
    """On a GPU `sorted_mm` runs torch's grouped kernel; outputs and all gradients agree with `eager` there, and the
    weight gradients of experts that got no pairs are exactly zero."""
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    outputs = {}
    for implementation in ("eager", "sorted_mm"):
        experts = experts_module(implementation).to("cuda", dtype)
        generator = torch.Generator().manual_seed(1)
        hidden = torch.randn(40, 32, generator=generator).to("cuda", dtype).requires_grad_()
        index = (torch.randint(0, 2, (40, 2), generator=generator) * 2).cuda()  # experts 1 and 3 get nothing
        weights = torch.rand(40, 2, generator=generator).to("cuda", dtype).requires_grad_()
        assert experts_kernels._grouped_kernel_applies(hidden, experts.gate_up_proj)
        out = experts(hidden, index, weights)
        out.backward(torch.ones_like(out))
        outputs[implementation] = (out, hidden.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    for ours, reference in zip(outputs["sorted_mm"], outputs["eager"]):
        assert_close(ours.float(), reference.float(), atol=tolerance, rtol=tolerance)
    for gradient in outputs["sorted_mm"][3:]:
        assert torch.equal(gradient[[1, 3]], torch.zeros_like(gradient[[1, 3]]))
