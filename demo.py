"""The offline demo: pick-and-place in the simulated SO-100, learned from scratch on a laptop.

    python train.py          # no --data: record, write the tiny VLM, train, evaluate (outputs/demo)

The simulator's scripted expert (sim.py) records demonstrations as a LeRobot dataset; a tiny SmolVLA
whose VLM is random (no pretrained VLM is this small) learns them with train.py's loop; and the
policy is then judged closed loop on scenes never used for recording. This file holds what makes
the run a demo: its recipe (DEFAULTS), the policy's size (TinyVLM, policy_config, write_vlm), its
data (ensure) and its verdict (evaluate). train.py holds the loop and calls these when --data is
absent; it reads DEFAULTS for any command line without --data (the demo's --output-dir, a resumed
run), so the simulator and MuJoCo are imported only where they run.

Under the run's --output-dir:
    dataset/                the recorded demonstrations (LeRobot v3.0, FPS fps, two IMAGE x IMAGE cameras)
    vlm/                    config.json and a byte-level BPE tokenizer.json trained on the task strings
    eval.json, eval.mp4     closed-loop success on held-out scenes, and a video of the first episodes
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cli
import flow
import policy_io

# The recipe: a tiny model learns faster with a higher learning rate and a short schedule. Its VLM is
# random, so it is trained too: then the policy really reads the cube's position from the images
# (frozen random features carry it only weakly). Flags given on the command line override these.
DEFAULTS = dict(chunk_size=10, steps=3_000, batch_size=32, lr=1e-3, warmup_steps=100, decay_steps=3_000, decay_lr=2e-5,
                train_vision=True, train_vlm=True,
                save_every=500, log_every=25, eval_every=250, val_episodes="2", val_samples=128,
                num_workers=0, preload=True, output_dir="outputs/demo")
IMAGE = 96  # the tiny vision encoder's input side, the cameras' size: 12-pixel patches, 8x8 of them
FPS = 10
NOISE = 0.04  # radians of wandering offset while recording (DART): demonstrations of recovering
EVAL_SEED = 10_000  # recording uses scene seeds 0, 1, ...; evaluation starts here, far above


def dataset_dir(output_dir: Path) -> Path:
    """The demo's recording: what it trains on, wherever the run's directory now is."""
    return output_dir / "dataset"


def vlm_dir(output_dir: Path) -> Path:
    return output_dir / "vlm"


# ----------------------------------------------------------------------------------------------
# The tiny policy


def policy_config(vlm: Path, chunk_size: int, expert_attention: dict) -> flow.SmolVLAConfig:
    """The demo policy: every layer of the tiny VLM, 16 language tokens, images at the vision
    encoder's side (IMAGE for the demo's VLM); the VLM found through vlm_model_name, so the
    checkpoint loads by its path alone."""
    config = json.loads((vlm / "config.json").read_text())
    side = config["vision_config"]["image_size"]
    return flow.SmolVLAConfig(chunk_size=chunk_size, n_action_steps=chunk_size, tokenizer_max_length=16,
                              num_vlm_layers=config["text_config"]["num_hidden_layers"], **expert_attention,
                              resize_imgs_with_padding=(side, side), vlm_model_name=str(vlm.resolve()))


@dataclass(frozen=True)
class TinyVLM:
    """The sizes of a SmolVLM-shaped VLM small enough to train from scratch on a CPU. The defaults
    are the demo's (~0.4 M parameters with its expert): IMAGE-pixel images cut into 8x8 patches,
    pixel-shuffled 2x2 into 16 image tokens."""

    image: int = IMAGE  # the vision encoder's input side (images are resized to it, padded)
    patch: int = IMAGE // 8
    scale_factor: int = 2  # the connector's pixel shuffle: (image / patch / scale_factor)^2 image tokens
    vision_hidden: int = 32
    vision_layers: int = 2
    text_hidden: int = 64  # the action expert is 0.75 of this wide
    text_layers: int = 4


def vlm_config(vocab_size: int, size: TinyVLM = TinyVLM()) -> dict:
    """A SmolVLM-shaped config of `size` (4 attention heads everywhere, 2 key/value heads in the LM)."""
    return {
        "model_type": "smolvlm", "scale_factor": size.scale_factor,
        "text_config": {"hidden_size": size.text_hidden, "intermediate_size": 2 * size.text_hidden,
                        "num_hidden_layers": size.text_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "head_dim": size.text_hidden // 4, "rms_norm_eps": 1e-5, "vocab_size": vocab_size},
        "vision_config": {"hidden_size": size.vision_hidden, "intermediate_size": 2 * size.vision_hidden,
                          "num_hidden_layers": size.vision_layers, "num_attention_heads": 4,
                          "image_size": size.image, "patch_size": size.patch,
                          "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"},
    }


def write_vlm(vlm: Path, tasks: list[str], size: TinyVLM = TinyVLM()) -> None:
    """config.json and a byte-level BPE tokenizer.json trained on the task strings, with SmolVLM's
    special tokens (<|im_end|> is the padding token), so flow.Tokenizer reads it as the real one.
    Written atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([t + "\n" for t in tasks], trainer=trainer)
    with cli.writing_dir(vlm) as partial:
        tokenizer.save(str(partial / "tokenizer.json"))
        (partial / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|im_end|>"}, indent=2))
        (partial / "config.json").write_text(json.dumps(vlm_config(tokenizer.get_vocab_size(), size), indent=2))


# ----------------------------------------------------------------------------------------------
# The data and the verdict, in the simulator


def ensure(output_dir: Path, episodes: int) -> None:
    """The demo's VLM and dataset under output_dir, written the first time (both atomically), reused
    after that (a resumed demo trains on the same recording)."""
    import sim  # MuJoCo: only where the simulator runs

    if not vlm_dir(output_dir).is_dir():
        write_vlm(vlm_dir(output_dir), [sim.TASK])
    if not dataset_dir(output_dir).is_dir():
        print(f"recording {episodes} scripted demonstrations in the simulator to {dataset_dir(output_dir)} "
              f"(LeRobot v3.0, {FPS} fps) ...", flush=True)
        record(dataset_dir(output_dir), episodes)


def record(dataset: Path, episodes: int) -> None:
    """The scripted expert's demonstrations from scene seeds 0, 1, ..., with the DART offset."""
    import sim

    with sim.SO100Env() as env:
        sim.record(env, dataset, episodes, seed=0, fps=FPS, noise=NOISE, log=lambda line: print("  " + line, flush=True))


def evaluate(policy: flow.SmolVLA, output_dir: Path, episodes: int, fps: float) -> dict:
    """The trained policy closed loop on held-out scenes: success rate, its 95% interval, completion
    time; eval.json and a video of the first episodes beside the run."""
    policy.eval()
    video = output_dir / "eval.mp4"
    print(f"evaluating closed loop on {episodes} held-out scenes (seeds {EVAL_SEED}.."
          f"{EVAL_SEED + episodes - 1}) ...", flush=True)
    summary = closed_loop(policy, episodes, fps, video)
    (output_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    low, high = summary["ci95"]
    completion = summary["mean_completion_s"]
    print(f"success {summary['successes']}/{episodes} = {summary['success_rate']:.0%} (95% CI {low:.0%}-{high:.0%})"
          + (f", mean completion {completion:.1f} s" if completion is not None else "")
          + f", idle ticks {summary['idle_ticks']}; {output_dir / 'eval.json'}, video {video}", flush=True)
    return summary


def closed_loop(policy: flow.SmolVLA, episodes: int, fps: float, video: Path) -> dict:
    """sim.py's evaluation of the policy in the SO-100 scene on seeds EVAL_SEED, EVAL_SEED + 1, ...
    at `fps`, through the control loop a real arm runs (the SO-100's client settings)."""
    import sim

    with sim.SO100Env() as env:
        config = sim.EvalConfig(episodes=episodes, seed=EVAL_SEED, client=sim.client_config(env, fps), video=str(video))
        return sim.evaluate(env, policy_io.make_policy_fn(policy), policy_io.policy_spec(policy), config,
                            log=lambda line: print("  " + line, flush=True))
