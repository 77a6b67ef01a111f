"""bench.py: the FLOP counts behind its efficiency figures, checked against counts made by hand, and
its command line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench
import flow
from flow import SmolVLA, SmolVLAConfig

VLM = Path(__file__).parent / "fixtures" / "tiny" / "vlm"

# -- FLOP count (bench.py's efficiency figures) -----------------------------------------------------------

# A policy small enough to count its multiply-adds by hand: one camera of 2x2 patches, 2 VLM layers
# (1 key/value head), an expert layer of each kind, a chunk of 3 actions, 2 denoising steps.
MICRO_VLM = {"model_type": "smolvlm", "scale_factor": 2,
             "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 304},
             "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "image_size": 16, "patch_size": 8}}


def micro_policy() -> SmolVLA:
    cfg = SmolVLAConfig(
        input_features={"observation.images.top": {"type": "VISUAL", "shape": [3, 16, 16]},
                        "observation.state": {"type": "STATE", "shape": [2]}},
        output_features={"action": {"type": "ACTION", "shape": [2]}}, chunk_size=3, n_action_steps=3,
        max_state_dim=4, max_action_dim=4, resize_imgs_with_padding=(16, 16), tokenizer_max_length=4,
        num_steps=2, num_vlm_layers=2, expert_width_multiplier=0.5)
    torch.manual_seed(0)
    policy = SmolVLA(cfg, MICRO_VLM, flow.Tokenizer(VLM, 4, True)).eval()
    policy.set_stats({k: {"mean": torch.zeros(2), "std": torch.ones(2)} for k in ("observation.state", "action")})
    return policy


def test_chunk_flops_match_a_hand_count():
    policy = micro_policy()
    assert (policy.expert_cfg.hidden_size, policy.expert_cfg.intermediate_size) == (8, 256)
    batch = {"observation.images.top": torch.rand(1, 3, 16, 16), "observation.state": torch.zeros(1, 2),
             "task": "push"}
    # 2 FLOPs per multiply-add. Vision, 4 patches of 3x8x8 pixels, width 8, 2 heads of 4:
    patches = 2 * 4 * 192 * 8
    vision_layer = 4 * (2 * 4 * 8 * 8) + 2 * 2 * 4 * 4 * (4 + 4) + 2 * (2 * 4 * 8 * 16)  # q,k,v,out; attention; MLP
    connector = 2 * 1 * 32 * 16  # 2x2 patches shuffled into one token of 32, projected to 16
    # Prefix of 6 tokens (1 image, 4 language, 1 state), width 16, 2 query heads of 8, 1 key/value head:
    state = 2 * 4 * 16
    vlm_layer0 = (2 * 6 * 16 * 16 + 2 * (2 * 6 * 16 * 8)  # q; k, v
                  + 2 * 2 * 6 * 6 * (8 + 8) + 2 * 6 * 16 * 16 + 3 * (2 * 6 * 16 * 32))  # attention; o; MLP
    vlm_layer1 = 2 * (2 * 6 * 16 * 8)  # the last layer: only its keys and values are used
    cross_kv = 2 * (2 * 6 * 8 * 8)  # expert layer 1 projects the prefix keys/values once per chunk
    # One denoising step, 3 action tokens, expert width 8, MLP 256:
    suffix = 2 * 3 * 4 * 8 + 2 * 3 * 16 * 8 + 2 * 3 * 8 * 8  # action_in_proj, time MLP in and out
    mlp = 3 * (2 * 3 * 8 * 256)
    expert_self = 2 * 3 * 8 * 16 + 2 * (2 * 3 * 8 * 8) + 2 * 2 * 3 * (6 + 3) * (8 + 8) + 2 * 3 * 16 * 8 + mlp
    expert_cross = 2 * 3 * 8 * 16 + 2 * 2 * 3 * 6 * (8 + 8) + 2 * 3 * 16 * 8 + mlp
    step = suffix + expert_self + expert_cross + 2 * 3 * 8 * 4  # ... action_out_proj
    by_hand = patches + vision_layer + connector + state + vlm_layer0 + vlm_layer1 + cross_kv + 2 * step
    assert by_hand == 216_576
    _, flops = bench.count_flops(lambda: policy.predict_chunk(batch))
    assert flops == by_hand


def test_attention_flops_forward_and_backward():
    """SDPA on the CPU, 2 heads, 3 queries over 5 keys of width 8: 2*2*3*5*(8+8) = 960 forward; the
    backward recomputes the scores and forms four gradients, five products of that size: 2400."""
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 5, 8, requires_grad=True), torch.randn(1, 2, 5, 8, requires_grad=True)
    attend = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(3, 5))  # noqa: E731
    _, forward = bench.count_flops(attend)
    _, both = bench.count_flops(lambda: attend().sum().backward())
    assert (forward, both) == (960, 960 + 2400)




@pytest.mark.slow
def test_full_size_chunk_flops():
    """The chunk `bench.py infer` times: smolvla_base's (2 cameras, 48 language tokens, chunk 50, 10
    steps) costs about 585 GFLOP by hand: SigLIP ~213 per camera, the 16-layer VLM prefix ~56, the
    expert ~10 per denoising step."""
    policy = bench.smolvla_base(torch.device("cpu"), torch.float32, cameras=2, height=480, width=640)
    batch = bench.observation_batch(policy, 1, 480, 640, torch.device("cpu"))
    actions, flops = bench.count_flops(lambda: policy.predict_chunk(batch))
    assert actions.shape == (1, 50, 6) and torch.isfinite(actions).all()
    assert 575e9 < flops < 600e9


# -- bench.py command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag, allowed", [
    (["infer", "--batch", "0"], "--batch", "an integer >= 1, got '0'"),
    (["infer", "--batch", "1", "-3"], "--batch", "an integer >= 1, got '-3'"),
    (["infer", "--repeats", "0"], "--repeats", "an integer >= 1"),
    (["infer", "--cameras", "two"], "--cameras", "an integer >= 1, got 'two'"),
    (["infer", "--device", "gpu"], "--device", "cpu, cuda, cuda:N or mps, got 'gpu'"),
    (["train", "--batch-size", "-3"], "--batch-size", "an integer >= 1"),
    (["train", "--width", "8"], "--width", "an integer from 16 to 4096, got '8'"),
    (["data", "--workers", "-1"], "--workers", "an integer >= 0, got '-1'"),
    (["data", "--batches", "0"], "--batches", "an integer >= 1"),
])
def test_bench_argument_mistakes_are_one_line(argv, flag, allowed, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert f"argument {flag}: expected {allowed}" in err


def test_bench_fast_mode_on_a_gpu_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert bench.parse_args(["infer", "--device", "cuda"]).device == "cuda"
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["infer", "--device", "cuda", "--fast"])
    assert exit_.value.code == 2 and "--fast: the fast modes run on the CPU only" in capsys.readouterr().err


def test_bench_fast_takes_an_optional_mode(capsys):
    assert bench.parse_args(["infer"]).fast is None
    assert bench.parse_args(["infer", "--fast", "--batch", "1"]).fast == "auto"  # bare: the CPU's choice
    for mode in ("all", *flow.FAST_MODES):
        assert bench.parse_args(["infer", "--fast", mode]).fast == mode
    for argv, message in [(["infer", "--fast", "int4"], "argument --fast: invalid choice: 'int4'"),
                          (["infer", "--fast", "--dtype", "bfloat16"], "made from the float32 policy")]:
        with pytest.raises(SystemExit) as exit_:
            bench.parse_args(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and message in err


def test_fast_mode_ceilings_are_measured(capsys):
    """Each mode's efficiency is held to its own dtype's GEMM throughput (tiny sizes here)."""
    assert set(bench.FAST_MODE_CEILING) == set(flow.FAST_MODES)
    for dtype in set(bench.FAST_MODE_CEILING.values()):
        assert bench.gemm_ceiling(dtype, size=64) > 0
    assert '"dtype": "int8 dynamic linear"' in capsys.readouterr().out


@pytest.mark.parametrize("mode", flow.FAST_MODES)
def test_compare_fast_reports_mode_speed_fidelity_and_efficiency(mode):
    exact = micro_policy()
    batch = {"observation.images.top": torch.rand(1, 3, 16, 16), "observation.state": torch.zeros(1, 2), "task": "push"}
    noise = torch.randn(1, 3, 4)
    actions, flops = bench.count_flops(lambda: exact.predict_chunk(batch, noise))
    record = bench.compare_fast(exact, micro_policy().make_fast(mode), batch, noise, actions, flops / 1e9,
                                ceiling=100.0, repeats=2, chosen=False)
    assert record["mode"] == f"fast-{mode}" and record["ceiling_dtype"] == bench.FAST_MODE_CEILING[mode]
    assert record["ms_per_chunk"] > 0 and record["speedup_vs_exact"] > 0 and record["exact_ms_same_run"] > 0
    assert record["within_bound"] and record["max_abs_action_diff_std"] >= record["mean_abs_action_diff_std"]
    assert record["efficiency"] == pytest.approx(record["gflops"] / 100.0, abs=1e-3)


def test_bench_batch_zero_prints_no_record():
    """The real command: exit status 2, one line on stderr, and no JSON record on stdout."""
    done = subprocess.run([sys.executable, "bench.py", "infer", "--batch", "0"], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=120)
    assert (done.returncode, done.stdout, done.stderr.count("\n")) == (2, "", 1)
    assert "--batch: expected an integer >= 1, got '0'" in done.stderr


def test_bench_prints_the_versions_it_measured_with():
    import av
    import mujoco
    import numpy as np

    record = bench.environment()
    assert (record["torch"], record["numpy"], record["av"], record["mujoco"]) == (
        torch.__version__, np.__version__, av.__version__, mujoco.__version__)
    assert record["cpus"] == os.cpu_count() and record["cpu"]
