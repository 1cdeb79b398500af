"""How good is a trained MNIST model's clean-image estimate at each noise level, and does it use the label?

For held-out digits x0 noised to x_t at a few timesteps, the model's ε gives
x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t (clipped to [−1, 1], as the samplers do). The script prints the
MSE of x̂0 with the right label, a wrong label (y + 3 mod 10) and the null label, next to two
yardsticks that need no model: the MSE of the mean training image (what a model that knows nothing
but the data set can reach) and of the right / wrong class-mean image (what the label alone is worth).
A model whose x̂0 at large t is worse than the mean image, or whose right and wrong labels give the
same error, cannot draw class-conditional digits however good its ε-MSE looks (at t = 900 of the
linear schedule an ε error is amplified ~30× in x̂0).

    python scripts/denoiser_by_timestep.py --ckpt src/dcdit/assets/mnist_dcdit.safetensors
"""

from __future__ import annotations

import argparse

import torch

from dcdit.checkpoint import load_model
from dcdit.data.mnist import load_mnist_tensors
from dcdit.diffusion import create_diffusion


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
    ac = torch.as_tensor(create_diffusion("", noise_schedule=schedule).alphas_cumprod, dtype=torch.float32)
    x_train, y_train = load_mnist_tensors("train")
    x, y = load_mnist_tensors("test")
    x, y = x[: args.num_images], y[: args.num_images]
    wrong = (y + 3) % 10
    mean_image = x_train.mean(0)
    class_means = torch.stack([x_train[y_train == c].mean(0) for c in range(10)])

    def mse(a: torch.Tensor) -> float:
        return ((a - x) ** 2).mean().item()

    print(f"{args.ckpt} (step {step}, {schedule} schedule), {len(x)} held-out digits")
    print(f"yardsticks: mean image {mse(mean_image.expand_as(x)):.3f}, right class mean "
          f"{mse(class_means[y]):.3f}, wrong class mean {mse(class_means[wrong]):.3f}")
    print("| t | ᾱ_t | x̂0-MSE right label | wrong label | null label | ε-MSE right label |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(args.seed)
    for t0 in args.timesteps:
        a = ac[t0]
        noise = torch.randn(x.shape, generator=gen)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        t = torch.full((len(x),), t0)
        row = []
        for labels in (y, wrong, torch.full_like(y, model.num_classes)):
            out = model(x_t, t, labels)
            eps = (out[0] if isinstance(out, tuple) else out)[:, : x.shape[1]]
            x0_hat = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            row.append((mse(x0_hat), ((eps - noise) ** 2).mean().item()))
        print(f"| {t0} | {a:.4f} | {row[0][0]:.3f} | {row[1][0]:.3f} | {row[2][0]:.3f} | {row[0][1]:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
