"""Run under torchrun by test_distributed.py: train a few steps and record what each rank saw.

argv: OUT_JSON WORK_DIR STRATEGY STEPS [KEY=VALUE ...] (config=NAME: another tiny config). Writes, from rank 0, per-rank local losses, the loss mean
over ranks, the captions of each rank's first batch and a hash of each rank's full UNet weights
after every step, and saves the full weights to WORK_DIR/final.safetensors.
"""

import hashlib
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_cfg  # noqa: E402

from pgv25.engine import distributed  # noqa: E402
from pgv25.engine.runner import Trainer  # noqa: E402


def full_weights(unet) -> dict:
    """Every rank's view of the whole UNet (sharded parameters gathered on every rank)."""
    state = {}
    for name, value in unet.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[name] = value.detach().cpu().contiguous()
    return state


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].numpy().tobytes())
    return h.hexdigest()


def main(out: str, work_dir: str, strategy: str, steps: int, *options: str) -> None:
    """An option `config=NAME` picks another tiny config than the default."""
    config = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in options}.get("config", "playgroundv2_5_tiny_shapes")
    options = [o for o in options if not o.startswith("config=")]
    cfg = tiny_cfg(work_dir, f"strategy={strategy}", "sample_grid.prompts=[]", f"train_cfg.max_iters={steps}", *options,
                   config=config)
    trainer = Trainer(cfg)
    first_captions = list(next(iter(trainer._loader(0)))["caption"])
    record = {"captions": distributed.gather_objects(first_captions), "steps": []}
    for _ in range(steps):
        result = trainer.step()
        weights = full_weights(trainer.trained)  # the UNet, or with text-encoder LoRA all that trains
        record["steps"].append({
            "local_loss": distributed.gather_objects(float(result.loss)),
            "mean_loss": distributed.gather_objects(float(distributed.mean_over_ranks(result.loss))),
            "weights": distributed.gather_objects(digest(weights)),
        })
    if trainer.rank == 0:
        save_file(weights, str(Path(work_dir) / "final.safetensors"))
        Path(out).write_text(json.dumps(record))


if __name__ == "__main__":
    from pgv25.cli import exit_now

    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
    exit_now(0)  # as the CLI does: no gloo teardown (see exit_now)
