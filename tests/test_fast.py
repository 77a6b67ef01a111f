"""The CPU speed modes (flow.SmolVLA.make_fast): which one a CPU gets, and what each costs in fidelity.

The selection is checked by hand on the instruction-set flags of each CPU family; each mode's
actions are held to flow.INT8_FIDELITY_BOUND against the exact float32 path on the golden fixture
(a tiny policy, so this runs in seconds; bench.py infer --fast measures the full-size model)."""

import json
from pathlib import Path

import pytest
import torch

import flow
from flow import SmolVLA

FIXTURE = Path(__file__).parent / "fixtures" / "tiny"
POLICY, VLM = FIXTURE / "policy", FIXTURE / "vlm"
CAMERAS = ["observation.images.top", "observation.images.wrist"]

# /proc/cpuinfo flags, cut down to what matters, of the CPU families the project runs on.
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"}
ZEN4 = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
CASCADE_LAKE = {"avx2", "avx512f", "avx512_vnni"}  # VNNI without BF16
ZEN2 = {"avx", "avx2", "fma"}  # AVX2 only
OLD_X86 = {"sse4_2", "avx"}  # no AVX2: fbgemm cannot run


@pytest.mark.parametrize("flags, machine, mode", [
    (SAPPHIRE_RAPIDS, "x86_64", "bf16"),
    (ZEN4, "x86_64", "int8"),
    (CASCADE_LAKE, "x86_64", "int8"),
    (ZEN2, "x86_64", "int8"),
    (OLD_X86, "x86_64", "fp32"),
    (set(), "x86_64", "fp32"),  # nothing known (no /proc, no vector kernels)
    (set(), "arm64", "int8"),  # Apple silicon: qnnpack
])
def test_mode_chosen_by_cpu_flags(flags, machine, mode):
    if machine == "arm64" and "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this PyTorch build has no qnnpack")
    assert flow.choose_fast_mode(flags, machine) == mode


def test_flags_without_proc_come_from_pytorch(monkeypatch):
    """Without /proc/cpuinfo (macOS, Windows) the flags are what PyTorch's dispatch found."""
    real_read = Path.read_text

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    for capability, flags in [("AVX512", {"avx2", "avx512f"}), ("AVX2", {"avx2"}), ("DEFAULT", set())]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert flow.cpu_flags() == flags
    assert flow.choose_fast_mode(flow.cpu_flags(), "x86_64") == "fp32"


def test_this_cpu_gets_a_mode():
    assert flow.choose_fast_mode() in flow.FAST_MODES


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    return load_file(str(FIXTURE / "golden.safetensors"))


@pytest.fixture(scope="module")
def exact():
    return SmolVLA.from_pretrained(POLICY, vlm=VLM, device="cpu")


def observation(golden) -> dict:
    batch = {cam: golden[f"input.{cam}"] for cam in CAMERAS}
    batch["observation.state"] = golden["input.state"]
    batch["task"] = json.loads((FIXTURE / "golden.json").read_text())["tasks"]
    return batch


@pytest.mark.parametrize("mode", flow.FAST_MODES)
def test_each_mode_within_the_fidelity_bound(mode, exact, golden):
    fast = SmolVLA.from_pretrained(POLICY, vlm=VLM, device="cpu", fast=mode)
    assert fast.fast_mode == mode and fast.quantized
    batch = observation(golden)
    a = exact.predict_chunk(batch, noise=golden["input.noise"])
    b = fast.predict_chunk(batch, noise=golden["input.noise"])
    difference = ((a - b).abs() / exact.normalizer.stats["action"]["std"]).mean()
    assert b.dtype == torch.float32 and difference < flow.INT8_FIDELITY_BOUND
    if mode == "fp32":  # only the fused q/k/v and the layout: float32 rounding
        assert difference < 1e-4
    with pytest.raises(RuntimeError, match="cannot be saved"):
        fast.save_pretrained("unused")


def test_auto_is_the_chosen_mode_and_misuse_is_refused(exact):
    fast = SmolVLA.from_pretrained(POLICY, vlm=VLM, device="cpu", fast=True)
    assert fast.fast_mode == flow.choose_fast_mode()
    assert exact.fast_mode == "off"
    with pytest.raises(RuntimeError, match="already in the fast mode"):
        fast.make_fast("int8")
    with pytest.raises(ValueError, match="unknown fast mode 'int4'"):
        SmolVLA.from_pretrained(POLICY, vlm=VLM, device="cpu", fast="int4")


def test_quantize_int8_is_the_int8_mode():
    policy = SmolVLA.from_pretrained(POLICY, vlm=VLM, device="cpu").quantize_int8()
    assert policy.fast_mode == "int8"
    assert isinstance(policy.vision.layers[0].self_attn, flow.FusedVisionAttention)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_vision_block_computes_the_block_it_replaces(dtype, exact):
    """The fast modes' in-place block gives the model's own block's values bit for bit with the
    checkpoint's tanh GELU; with the erf GELU (bf16 and int8 modes) within the two forms' largest
    difference (4.7e-4 at x = 2.7) passed through the rest of the block."""
    import copy

    block = copy.deepcopy(exact.vision.layers[0]).to(dtype)
    x = torch.randn(2, 16, block.layer_norm1.normalized_shape[0], generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        expected = block(x)
        fast = flow.InPlaceVisionBlock(copy.deepcopy(block))
        assert torch.equal(fast(x.clone()), expected)
        fast.gelu_approximate = "none"
        erf = fast(x.clone())
    assert not torch.equal(erf, expected) or dtype == torch.bfloat16
    tolerance = 1e-3 if dtype == torch.float32 else 0.05  # bfloat16: a step of the output's own rounding
    assert (erf.float() - expected.float()).abs().max() < tolerance


def test_erf_gelu_only_where_activations_are_rounded():
    assert all(b.gelu_approximate == "tanh" for b in
               SmolVLA.from_pretrained(POLICY, vlm=VLM, device="cpu", fast="fp32").vision.layers)
    assert all(b.gelu_approximate == "none" for b in
               SmolVLA.from_pretrained(POLICY, vlm=VLM, device="cpu", fast="bf16").vision.layers)
