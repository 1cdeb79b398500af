"""How good is a trained MNIST model's clean-image estimate at each noise level, and does it use the label?

Prints, for held-out digits noised to a few timesteps, the MSE of the model's x̂0 with the right, a
wrong and the null label next to yardsticks that need no model (mean training image, right / wrong
class-mean image); the measurement is ``dcdit.evaluation.denoiser`` (see its docstring).

    python scripts/denoiser_by_timestep.py --ckpt src/dcdit/assets/mnist_dcdit.safetensors
"""

from __future__ import annotations

import argparse

import torch

from dcdit.checkpoint import load_model
from dcdit.data.mnist import load_mnist_tensors
from dcdit.evaluation.denoiser import denoiser_error_by_timestep, wrong_labels


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a run folder, checkpoint folder or .safetensors of an MNIST model")
    ap.add_argument("--raw-weights", action="store_true", help="the raw weights instead of the EMA (folders only)")
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model, _, step = load_model(args.ckpt, use_ema=not args.raw_weights)
    model.eval()
    schedule = getattr(model, "noise_schedule", "linear")
    x_train, y_train = load_mnist_tensors("train")
    x, y = load_mnist_tensors("test")
    x, y = x[: args.num_images], y[: args.num_images]
    class_means = torch.stack([x_train[y_train == c].mean(0) for c in range(10)])

    def mse(a: torch.Tensor) -> float:
        return ((a - x) ** 2).mean().item()

    print(f"{args.ckpt} (step {step}, {schedule} schedule), {len(x)} held-out digits")
    print(f"yardsticks: mean image {mse(x_train.mean(0).expand_as(x)):.3f}, right class mean "
          f"{mse(class_means[y]):.3f}, wrong class mean {mse(class_means[wrong_labels(y, 10)]):.3f}")
    print("| t | ᾱ_t | x̂0-MSE right label | wrong label | null label | ε-MSE right label |")
    print("|---|---|---|---|---|---|")
    for r in denoiser_error_by_timestep(model, x, y, args.timesteps, seed=args.seed):
        print(f"| {r.t} | {r.alpha_bar:.4f} | {r.x0_mse_right:.3f} | {r.x0_mse_wrong:.3f} | {r.x0_mse_null:.3f} "
              f"| {r.eps_mse_right:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
